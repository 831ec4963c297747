"""From a RateLimitRequest to a RateLimitResponse: match, replace, count, aggregate, measure.

:class:`RateLimiter` holds the current config as one immutable reference (``swap`` replaces it, a
request in flight keeps the one it started with), a :class:`~.backends.Backend` and a clock. It
raises :class:`RateLimitError`; the servicer (:mod:`.service`) turns that into an answer.

Semantics follow envoyproxy/ratelimit: each request descriptor is matched independently; a limit
named in another matched limit's ``replaces`` is neither checked nor counted; the overall code is
OVER_LIMIT when any descriptor is; shadow mode (per descriptor, or global) counts and reports but
answers OK; unlimited descriptors answer OK with ``limit_remaining`` 2^32-1 without touching the
store; a descriptor nothing matches answers OK with no current limit. The cost of a hit is the
descriptor's ``hits_addend`` when set, else the request's, else 1. A descriptor carrying its own
``limit`` (Envoy's route-level override) is counted against that limit, as a fixed window.

Several limits on one descriptor are counted independently, each by its own algorithm, in the same
round trip: a hit refused by one limit still counts against a fixed window next to it (as
envoyproxy/ratelimit counts every descriptor of a request, refused or not), while sliding windows
and token buckets only take what they admit.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from envoy.service.ratelimit.v3 import rls_pb2
from envoy.type.v3 import ratelimit_unit_pb2

from legation.ratelimit.algorithms import Decision, Hit
from legation.ratelimit.backends import Backend
from legation.ratelimit.config import Limit, Match, RateLimitConfig
from legation.ratelimit.errors import RateLimitError
from legation.ratelimit.metrics import RateLimitMetrics

OK = rls_pb2.RateLimitResponse.OK
OVER_LIMIT = rls_pb2.RateLimitResponse.OVER_LIMIT
_UNIT = {name.lower(): v for name, v in rls_pb2.RateLimitResponse.RateLimit.Unit.items()}
_OVERRIDE_UNIT = {v: name.lower() for name, v in ratelimit_unit_pb2.RateLimitUnit.items()}
_ESCAPE = str.maketrans({"%": "%25", "|": "%7C", "=": "%3D"})
MAX_UINT32 = 0xFFFFFFFF
_MAX_PLANS = 4096
_MAX_PLANNED_REQUEST = 2048  # bytes: larger requests are planned each time, never kept


@dataclass(frozen=True, slots=True)
class _Checked:
    """One request descriptor after matching: its limits still in force and their counter keys."""

    match: Match | None
    metric_key: str
    limits: tuple[Limit, ...]
    keys: tuple[str, ...]
    cost: int
    shadow: bool
    unlimited: bool


# one descriptor as sent: entries, cost, the override's (unit, requests_per_unit) or None
_Shape = tuple[tuple[tuple[tuple[str, str], ...], int, tuple[int, int] | None], ...]
_Plan = tuple[tuple[_Checked, ...], tuple[Hit, ...]]


def _shape(request: rls_pb2.RateLimitRequest) -> _Shape:
    """The request's descriptors as plain values; raises on a malformed request."""
    domain = request.domain
    if not domain:
        raise RateLimitError("rate limit domain must not be empty", code="invalid_request")
    if not request.descriptors:
        raise RateLimitError("rate limit descriptor list must not be empty",
                             code="invalid_request")
    default_cost = request.hits_addend or 1
    shape = []
    for d in request.descriptors:
        entries = tuple((e.key, e.value) for e in d.entries)
        if not entries or any(not key for key, _ in entries):
            raise RateLimitError(f"domain {domain!r}: a descriptor has no entries or "
                                 "an entry with an empty key", code="invalid_request")
        cost = d.hits_addend.value if d.HasField("hits_addend") else default_cost
        override = (d.limit.unit, d.limit.requests_per_unit) if d.HasField("limit") else None
        shape.append((entries, cost, override))
    return tuple(shape)


class RateLimiter:
    def __init__(
        self,
        *,
        config: RateLimitConfig,
        backend: Backend,
        metrics: RateLimitMetrics,
        shadow_mode: bool = False,
        near_limit_ratio: float = 0.8,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.backend = backend
        self.metrics = metrics
        self.shadow_mode = shadow_mode
        self.near_limit_ratio = near_limit_ratio
        self.clock = clock
        self._counters: dict[tuple[str, str], tuple[object, ...]] = {}
        # serialized request -> its plan, for the config in _plans_for (a swap starts a new table)
        self._plans: dict[bytes, _Plan] = {}
        self._plans_for: RateLimitConfig | None = None

    def swap(self, config: RateLimitConfig) -> None:
        self.config = config

    async def should_rate_limit(
        self, request: rls_pb2.RateLimitRequest
    ) -> rls_pb2.RateLimitResponse:
        config = self.config  # one snapshot for the whole request
        checked, hits = self._plan(config, request)
        now_ms = int(self.clock() * 1000)
        decisions = await self.backend.hit(hits, now_ms) if hits else ()
        response = rls_pb2.RateLimitResponse(overall_code=OK)
        statuses = response.statuses
        at = 0
        for c in checked:
            status = statuses.add(code=OK)  # filled in place: append() would copy it
            n = len(c.limits)
            if self._status(request.domain, c, decisions[at:at + n], status):
                response.overall_code = OVER_LIMIT
            at += n
        return response

    def _plan(self, config: RateLimitConfig, request: rls_pb2.RateLimitRequest) -> _Plan:
        """The request's descriptors matched against ``config``, with the hits to count.

        Envoy sends the same few requests over and over (a route's descriptors, with values from
        a bounded set more often than not), so the plan is kept per request, keyed by its
        serialized bytes (domain, descriptors and hits_addend are all the request holds): checks,
        matching, key escaping and ``replaces`` are done once per distinct request and config, not
        once per call. The table is bounded: when full it is emptied (high-cardinality values then
        cost what they cost without the table, plus one dict insert), and only requests up to
        ``_MAX_PLANNED_REQUEST`` bytes are kept, so callers choosing long descriptor values cannot
        make it hold more than a few MB.
        """
        key = request.SerializeToString()
        if self._plans_for is not config:
            self._plans, self._plans_for = {}, config
        plan = self._plans.get(key)
        if plan is None:
            checked = self._match(config, request.domain, _shape(request))
            hits = tuple(Hit(k, limit, c.cost) for c in checked
                         for k, limit in zip(c.keys, c.limits, strict=True))
            plan = (checked, hits)
            if len(key) <= _MAX_PLANNED_REQUEST:
                if len(self._plans) >= _MAX_PLANS:
                    self._plans.clear()
                self._plans[key] = plan
        return plan

    def _match(
        self, config: RateLimitConfig, domain: str, shape: _Shape
    ) -> tuple[_Checked, ...]:
        found: list[tuple[tuple[tuple[str, str], ...], Match | None, int, Limit | None]] = []
        replaced: set[str] = set()
        for entries, cost, raw_override in shape:
            override = None
            if raw_override is not None:
                unit = _OVERRIDE_UNIT.get(raw_override[0], "unknown")
                if unit == "unknown":
                    raise RateLimitError(f"domain {domain!r}: descriptor limit override "
                                         "has no unit", code="invalid_request")
                override = Limit(unit=unit, requests_per_unit=raw_override[1])
            match = config.match(domain, entries)
            if match is not None and override is None:
                for limit in match.limits:
                    replaced |= limit.replaces
            found.append((entries, match, cost, override))
        out = []
        for entries, match, cost, override in found:
            base = domain + "|" + "|".join(
                f"{k.translate(_ESCAPE)}={v.translate(_ESCAPE)}" for k, v in entries)
            metric_key = match.metric_key if match else ".".join(
                [domain, *(k for k, _ in entries)])
            shadow = self.shadow_mode or (match is not None and match.descriptor.shadow_mode)
            if override is not None:
                limits: tuple[Limit, ...] = (override,)
                keys: tuple[str, ...] = (
                    f"{base}|override:{override.unit}:{override.requests_per_unit}",)
            elif match is None:
                limits, keys = (), ()
            else:
                limits = tuple(lim for lim in match.limits
                               if not (lim.name and lim.name in replaced) and not lim.unlimited)
                keys = tuple(f"{base}|{lim.algorithm.value}:{lim.unit}" for lim in limits)
            unlimited = match is not None and override is None and any(
                lim.unlimited for lim in match.limits)
            out.append(_Checked(match, metric_key, limits, keys, cost, shadow, unlimited))
        return tuple(out)

    def _status(
        self, domain: str, c: _Checked, decisions: Sequence[Decision],
        status: rls_pb2.RateLimitResponse.DescriptorStatus,
    ) -> bool:
        """Fill ``status`` (code OK) for one descriptor; True when it is over the limit."""
        if c.unlimited:
            status.limit_remaining = MAX_UINT32
            return False
        if not decisions:
            return False
        if len(decisions) == 1:  # the common case: one limit on the descriptor
            pick = 0
            denied = not decisions[0].allowed
        else:
            late = [(d.reset_ms, i) for i, d in enumerate(decisions) if not d.allowed]
            denied = bool(late)
            if late:
                pick = max(late)[1]  # the longest wait is the one to report
            else:
                pick = min((d.remaining, i) for i, d in enumerate(decisions))[1]
        limit, decision = c.limits[pick], decisions[pick]
        total, within, over, near, shadow = self._counters_for(domain, c.metric_key)
        total.inc(c.cost)  # type: ignore[attr-defined]
        over_limit = False
        if denied:
            over.inc(c.cost)  # type: ignore[attr-defined]
            if c.shadow:
                shadow.inc(c.cost)  # type: ignore[attr-defined]
            else:
                status.code = OVER_LIMIT
                over_limit = True
        else:
            within.inc(c.cost)  # type: ignore[attr-defined]
            used = limit.requests_per_unit - decision.remaining
            if used > limit.requests_per_unit * self.near_limit_ratio:
                near.inc(c.cost)  # type: ignore[attr-defined]
        current = status.current_limit
        if limit.name:
            current.name = limit.name
        current.requests_per_unit = limit.requests_per_unit
        current.unit = _UNIT[limit.unit]
        status.limit_remaining = min(decision.remaining, MAX_UINT32)
        reset = status.duration_until_reset
        reset.seconds, ms = divmod(decision.reset_ms, 1000)
        reset.nanos = ms * 1_000_000
        return over_limit

    def _counters_for(self, domain: str, metric_key: str) -> tuple[object, ...]:
        found = self._counters.get((domain, metric_key))
        if found is None:
            m = self.metrics
            found = tuple(counter.labels(domain, metric_key) for counter in (
                m.total_hits, m.within_limit, m.over_limit, m.near_limit, m.shadow_mode))
            if len(self._counters) < 100_000:  # bounded, whatever detailed_metric lets in
                self._counters[(domain, metric_key)] = found
        return found
