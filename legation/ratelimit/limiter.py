"""From a RateLimitRequest to a RateLimitResponse: match, replace, count, aggregate, measure.

:class:`RateLimiter` holds the current config as one immutable reference (``swap`` replaces it, a
request in flight keeps the one it started with), a :class:`~.backends.Backend` and a clock. It
raises :class:`RateLimitError`; the servicer (:mod:`.service`) turns that into an answer.

Semantics follow envoyproxy/ratelimit (``src/service/ratelimit.go``): each request descriptor is
matched independently; a limit named in another matched limit's ``replaces`` is neither checked nor
counted; a descriptor in shadow mode answers OK when over its limit (counted as such); the overall
code is OVER_LIMIT when a descriptor not in quota mode is over, or when every quota-mode descriptor
is; the global shadow mode then answers OK but leaves the statuses as they are; unlimited
descriptors answer OK with ``limit_remaining`` 2^32-1 without touching the store; a descriptor
nothing matches answers OK with no current limit. The cost of a hit is the descriptor's
``hits_addend`` when set (0 checks without counting), else the request's, else 1. A descriptor
carrying its own ``limit`` (Envoy's route-level override) in a known domain is counted against that
limit, on the counter the descriptor's entries and unit name (never in shadow mode).

Optional, as upstream's settings: ``response_headers`` (``LIMIT_RESPONSE_HEADERS_ENABLED``) adds
limit/remaining/reset headers for the descriptor closest to its limit; ``dynamic_metadata``
(``RESPONSE_DYNAMIC_METADATA``) returns the domain, the descriptors and the merged ``metadata`` of
the descriptors that passed.

Several limits on one descriptor are counted independently, each by its own algorithm, in the same
round trip: a hit refused by one limit still counts against a fixed window next to it (as
envoyproxy/ratelimit counts every descriptor of a request, refused or not), while sliding windows
and token buckets only take what they admit.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

from envoy.service.ratelimit.v3 import rls_pb2

from legation._prom import incrementer, queued
from legation.ratelimit import _wire
from legation.ratelimit._request import (
    ResponseHeaders,
    _Checked,
    _f32,
    _Fast,
    _metadata,
    _Plan,
    _Shape,
    _shape,
    match_descriptors,
    parse_request,
)
from legation.ratelimit.algorithms import Decision, Hit, fixed_window
from legation.ratelimit.backends import Backend
from legation.ratelimit.backends.memory import MemoryBackend, store_key
from legation.ratelimit.config import UNIT_SECONDS, Algorithm, Limit, RateLimitConfig
from legation.ratelimit.metrics import RateLimitMetrics

__all__ = ["MAX_UINT32", "OK", "OVER_LIMIT", "RateLimiter", "ResponseHeaders"]

OK = rls_pb2.RateLimitResponse.OK
OVER_LIMIT = rls_pb2.RateLimitResponse.OVER_LIMIT
MAX_UINT32 = 0xFFFFFFFF
_UNLIMITED = _wire.bare_status(OK, MAX_UINT32)
_NO_LIMIT = _wire.bare_status(OK)
_OVERALL_OK = _wire.overall(OK)
_MAX_PLANS = 4096
MAX_METRIC_KEYS = 10_000
"""Distinct descriptor metric keys (label values) one limiter exposes; later ones are counted
under :data:`OVERFLOW_METRIC_KEY` (their domain's)."""
OVERFLOW_METRIC_KEY = "_other"
_MAX_PLANNED_REQUEST = 2048  # bytes: larger requests are planned each time, never kept
_MAX_PLANNED_DESCRIPTORS = 8  # Envoy's routes send a few; more are planned each time


class RateLimiter:
    def __init__(
        self,
        *,
        config: RateLimitConfig,
        backend: Backend,
        metrics: RateLimitMetrics,
        shadow_mode: bool = False,
        quota_mode: bool = False,
        near_limit_ratio: float = 0.8,
        response_headers: ResponseHeaders | None = None,
        dynamic_metadata: bool = False,
        clock: Callable[[], float] = time.time,
        fast_path: bool = True,
    ) -> None:
        self.config = config
        self.backend = backend
        self.metrics = metrics
        self.shadow_mode = shadow_mode
        self.quota_mode = quota_mode
        self.near_limit_ratio = near_limit_ratio
        self.response_headers = response_headers
        self.dynamic_metadata = dynamic_metadata
        self.clock = clock
        self.fast_path = fast_path  # False: every answer through the general path (for tests)
        self._ratio32 = _f32(near_limit_ratio)
        # (domain, metric key) -> the hit counters' children, prebound (legation._prom)
        self._counters: dict[tuple[str, str], tuple[Callable[[float], None], ...]] = {}
        # serialized request -> its plan, for the config in _plans_for (a swap starts a new table)
        self._plans: dict[bytes, _Plan] = {}
        self._plans_for: RateLimitConfig | None = None
        self._plans_quota = quota_mode  # plans hold each descriptor's quota mode

    def swap(self, config: RateLimitConfig) -> None:
        self.config = config

    async def should_rate_limit(
        self, request: rls_pb2.RateLimitRequest
    ) -> rls_pb2.RateLimitResponse:
        """The answer to ``request`` as a message (for Python callers; the gRPC service sends
        :meth:`answer`'s bytes as they are)."""
        raw = await self.answer(request.SerializeToString(), request)
        return rls_pb2.RateLimitResponse.FromString(raw)

    async def answer(self, raw: bytes, request: rls_pb2.RateLimitRequest | None = None) -> bytes:
        """The serialized RateLimitResponse to the serialized request ``raw`` (``request``: the
        same, already parsed, if the caller has it). Raises :class:`RateLimitError`
        ``invalid_request`` when ``raw`` is not a well-formed request, or the backend's error."""
        config = self.config  # one snapshot for the whole request
        plan = self._plan(config, raw, request)
        hits = plan.hits
        now = self.clock()
        backend = self.backend
        fast = plan.fast
        if (
            fast is not None
            and type(backend) is MemoryBackend
            and self.response_headers is None
            and not self.dynamic_metadata
        ):  # one fixed window in memory: the answer when it allows, without the general loop
            ms = int(now * 1000)
            cost, rpu, near_at = fast.cost, fast.requests_per_unit, fast.near_at
            count = backend.count_fixed(fast.key, fast.window_ms, cost, ms)
            if count <= rpu:
                fast.allowed(cost)
                if count > near_at:
                    fast.near(cost if count - cost >= near_at else count - near_at)
                reset_ms = fast.window_ms - ms % fast.window_ms
                remaining = min(rpu - count, MAX_UINT32)
                return _OVERALL_OK + _wire.status(
                    OK, fast.field, remaining, -(-reset_ms // 1000), 0
                )
            decisions: Sequence[Decision] = [fixed_window(hits[0].limit, ms, cost, count)]
        elif not hits:
            decisions = ()
        elif type(backend) is MemoryBackend:  # no await inside: its hits, without a coroutine
            ms = int(now * 1000)
            decisions = [backend.hit_one(h, ms) for h in hits]
        else:
            decisions = await backend.hit(hits, int(now * 1000))
        domain = plan.domain
        parts = [b""]  # the overall code goes first, once known
        refused = quota_all = quota_over = 0
        closest: tuple[Limit, int] | None = None  # the limit closest to refusing, remaining
        least = MAX_UINT32
        passed: list[_Checked] = []
        at = 0
        for c in plan.checked:
            n = len(c.limits)
            if c.unlimited:
                at += n
                parts.append(_UNLIMITED)
                continue
            if not n:
                parts.append(_NO_LIMIT)
                passed.append(c)
                quota_all += c.quota
                continue
            code, pick = self._count(domain, c, decisions[at : at + n])
            decision, limit = decisions[at + pick], c.limits[pick]
            at += n
            remaining = min(decision.remaining, MAX_UINT32)
            if limit.algorithm is Algorithm.FIXED_WINDOW:  # whole seconds, as upstream
                seconds, nanos = -(-decision.reset_ms // 1000), 0
            else:
                seconds, millis = divmod(decision.reset_ms, 1000)
                nanos = millis * 1_000_000
            parts.append(_wire.status(code, c.fields[pick], remaining, seconds, nanos))
            if remaining < least:
                closest, least = (limit, remaining), remaining
            if code == OVER_LIMIT:
                if c.quota:
                    quota_over += 1
                else:
                    refused += 1
                    closest, least = (limit, remaining), 0
            else:
                passed.append(c)
            quota_all += c.quota
        overall = OK
        if refused or (quota_all and quota_all == quota_over):
            overall = OVER_LIMIT
            if self.shadow_mode:
                overall = OK
                self.metrics.global_shadow_mode.inc()
        parts[0] = _wire.overall(overall)
        if self.response_headers is not None and closest is not None:
            parts.append(self._headers(*closest, now))
        if self.dynamic_metadata:
            extra = rls_pb2.RateLimitResponse()
            parsed = request if request is not None else parse_request(raw)
            extra.dynamic_metadata.update(_metadata(parsed, passed))
            parts.append(extra.SerializeToString())
        return b"".join(parts)

    def _headers(self, limit: Limit, remaining: int, now: float) -> bytes:
        """The response's ``response_headers_to_add`` field for the status ``limit`` decided."""
        names = self.response_headers
        assert names is not None
        unit = UNIT_SECONDS[limit.unit]
        reset = unit - int(now) % unit
        extra = rls_pb2.RateLimitResponse()
        for key, value in (
            (names.limit, limit.requests_per_unit),
            (names.remaining, remaining),
            (names.reset, reset),
        ):
            extra.response_headers_to_add.add(key=key, value=str(value))
        return extra.SerializeToString()

    def _plan(
        self,
        config: RateLimitConfig,
        raw: bytes,
        request: rls_pb2.RateLimitRequest | None,
    ) -> _Plan:
        """The request's descriptors matched against ``config``, with the hits to count.

        Envoy sends the same few requests over and over (a route's descriptors, with values from
        a bounded set more often than not), so the plan is kept per request, keyed by its
        serialized bytes (domain, descriptors and hits_addend are all the request holds): parsing,
        checks, matching, key escaping and ``replaces`` are done once per distinct request and
        config, not once per call. The table is bounded: when full it is emptied
        (high-cardinality values then cost what they cost without the table, plus one dict
        insert), and only requests up to ``_MAX_PLANNED_REQUEST`` bytes and
        ``_MAX_PLANNED_DESCRIPTORS`` descriptors are kept (a plan costs about 0.6 KiB per
        descriptor), so whatever callers send, the table holds at most about 20 MB.
        """
        if self._plans_for is not config or self._plans_quota != self.quota_mode:
            self._plans, self._plans_for, self._plans_quota = {}, config, self.quota_mode
        plan = self._plans.get(raw)
        if plan is None:
            if request is None:
                request = parse_request(raw)
            checked = self._match(config, request.domain, _shape(request))
            hits = tuple(
                Hit(k, limit, c.cost)
                for c in checked
                for k, limit in zip(c.keys, c.limits, strict=True)
            )
            plan = _Plan(request.domain, checked, hits, self._fast(request.domain, checked, hits))
            if len(raw) <= _MAX_PLANNED_REQUEST and len(checked) <= _MAX_PLANNED_DESCRIPTORS:
                if len(self._plans) >= _MAX_PLANS:
                    self._plans.clear()
                self._plans[raw] = plan
        return plan

    def _fast(
        self, domain: str, checked: tuple[_Checked, ...], hits: tuple[Hit, ...]
    ) -> _Fast | None:
        """The fast path's part of a plan when it has that shape: one descriptor, counted
        against one fixed-window limit, not in shadow or quota mode, not unlimited."""
        if not self.fast_path or len(hits) != 1 or len(checked) != 1:
            return None
        c, hit = checked[0], hits[0]
        if c.unlimited or c.shadow or c.quota or hit.limit.algorithm is not Algorithm.FIXED_WINDOW:
            return None
        _, _, _, near, _, allowed = self._counters_for(domain, c.metric_key)
        return _Fast(
            key=store_key(hit.key),
            window_ms=hit.limit.window_ms,
            requests_per_unit=hit.limit.requests_per_unit,
            cost=hit.cost,
            near_at=c.near[0],
            field=c.fields[0],
            allowed=allowed,
            near=near,
        )

    def _match(self, config: RateLimitConfig, domain: str, shape: _Shape) -> tuple[_Checked, ...]:
        return match_descriptors(
            config, domain, shape, near=self._near_threshold, quota_mode=self.quota_mode
        )

    def _near_threshold(self, requests_per_unit: int) -> int:
        """floor(limit x ratio) in float32, as upstream computes it (so 0.8 of 10 is 8)."""
        return min(requests_per_unit, math.floor(_f32(_f32(requests_per_unit) * self._ratio32)))

    def _count(self, domain: str, c: _Checked, decisions: Sequence[Decision]) -> tuple[int, int]:
        """Count one limited descriptor's hits in the metrics; its status code and which of its
        limits the status reports."""
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
        decision, near_at = decisions[pick], c.near[pick]
        total, _, over, near, shadow, allowed = self._counters_for(domain, c.metric_key)
        cost, rpu, used = c.cost, c.limits[pick].requests_per_unit, decision.used
        if not denied:
            allowed(cost)  # total and within
            if used < 0:
                used = rpu - decision.remaining
            if used > near_at:
                near(cost if used - cost >= near_at else used - near_at)
            return OK, pick
        total(cost)
        # upstream's split: hits past the limit are over; those between the near threshold and
        # the limit, when this hit crossed it, are near
        if used < 0 or used - cost >= rpu:
            over_hits = cost
        else:
            over_hits = used - rpu
            near(rpu - max(near_at, used - cost))
        over(over_hits)
        if c.shadow:
            shadow(over_hits)
            return OK, pick
        return OVER_LIMIT, pick

    def _counters_for(self, domain: str, metric_key: str) -> tuple[Callable[[float], None], ...]:
        """The descriptor's total, within, over, near and shadow counters (queued, see
        legation._prom), then one queued update moving total and within together (an allowed
        hit, the common case: one queue entry instead of two)."""
        found = self._counters.get((domain, metric_key))
        if found is None and len(self._counters) >= MAX_METRIC_KEYS:
            # values chosen by callers (detailed_metric, limit overrides) must not grow the
            # exposition without end: past the bound, new keys count under one per domain
            metric_key = OVERFLOW_METRIC_KEY
            found = self._counters.get((domain, metric_key))
        if found is None:
            m = self.metrics
            children = [
                counter.labels(domain, metric_key)
                for counter in (
                    m.total_hits,
                    m.within_limit,
                    m.over_limit,
                    m.near_limit,
                    m.shadow_mode,
                )
            ]
            total, within = (incrementer(c, direct=True) for c in children[:2])

            def allowed(cost: float) -> None:
                total(cost)
                within(cost)

            def allowed_many(costs: list[float]) -> None:
                checked = [float(c) for c in costs]  # what could raise, before any change
                if any(c < 0 for c in checked):
                    raise ValueError("a hit's cost is never negative")
                total.many(checked)
                within.many(checked)

            found = (*(incrementer(c) for c in children), queued(allowed, allowed_many))
            self._counters[(domain, metric_key)] = found  # bounded: MAX_METRIC_KEYS + domains
        return found
