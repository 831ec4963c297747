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
from legation.ratelimit._request import (
    ResponseHeaders,
    _Checked,
    _f32,
    _metadata,
    _Plan,
    _Shape,
    _shape,
    match_descriptors,
)
from legation.ratelimit.algorithms import Decision, Hit
from legation.ratelimit.backends import Backend
from legation.ratelimit.backends.memory import MemoryBackend
from legation.ratelimit.config import UNIT_SECONDS, Algorithm, RateLimitConfig
from legation.ratelimit.metrics import RateLimitMetrics

__all__ = ["MAX_UINT32", "OK", "OVER_LIMIT", "RateLimiter", "ResponseHeaders"]

OK = rls_pb2.RateLimitResponse.OK
OVER_LIMIT = rls_pb2.RateLimitResponse.OVER_LIMIT
_UNIT = {name.lower(): v for name, v in rls_pb2.RateLimitResponse.RateLimit.Unit.items()}
_UNIT_SECONDS = {v: UNIT_SECONDS[name] for name, v in _UNIT.items() if name in UNIT_SECONDS}
MAX_UINT32 = 0xFFFFFFFF
_MAX_PLANS = 4096
_MAX_PLANNED_REQUEST = 2048  # bytes: larger requests are planned each time, never kept


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
        self._ratio32 = _f32(near_limit_ratio)
        # (domain, metric key) -> the hit counters' children, prebound (legation._prom)
        self._counters: dict[tuple[str, str], tuple[Callable[[float], None], ...]] = {}
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
        now = self.clock()
        backend = self.backend
        if not hits:
            decisions: Sequence[Decision] = ()
        elif type(backend) is MemoryBackend:  # no await inside: its hits, without a coroutine
            ms = int(now * 1000)
            decisions = [backend.hit_one(h, ms) for h in hits]
        else:
            decisions = await backend.hit(hits, int(now * 1000))
        response = rls_pb2.RateLimitResponse(overall_code=OK)
        statuses = response.statuses
        refused = quota_all = quota_over = 0
        closest: rls_pb2.RateLimitResponse.DescriptorStatus | None = None
        least = MAX_UINT32
        passed: list[_Checked] = []
        at = 0
        for c in checked:
            status = statuses.add(code=OK)  # filled in place: append() would copy it
            n = len(c.limits)
            self._status(request.domain, c, decisions[at : at + n], status)
            at += n
            if c.unlimited:
                continue
            if status.limit_remaining < least and status.HasField("current_limit"):
                closest, least = status, status.limit_remaining
            if status.code == OVER_LIMIT:
                if c.quota:
                    quota_over += 1
                else:
                    refused += 1
                    closest, least = status, 0
            else:
                passed.append(c)
            quota_all += c.quota
        if refused or (quota_all and quota_all == quota_over):
            response.overall_code = OVER_LIMIT
        if self.response_headers is not None and closest is not None:
            self._headers(response, closest, now)
        if response.overall_code == OVER_LIMIT and self.shadow_mode:
            response.overall_code = OK
            self.metrics.global_shadow_mode.inc()
        if self.dynamic_metadata:
            response.dynamic_metadata.update(_metadata(request, passed))
        return response

    def _headers(
        self,
        response: rls_pb2.RateLimitResponse,
        status: rls_pb2.RateLimitResponse.DescriptorStatus,
        now: float,
    ) -> None:
        names = self.response_headers
        assert names is not None
        unit = _UNIT_SECONDS.get(status.current_limit.unit, 1)
        reset = unit - int(now) % unit
        for key, value in (
            (names.limit, status.current_limit.requests_per_unit),
            (names.remaining, status.limit_remaining),
            (names.reset, reset),
        ):
            response.response_headers_to_add.add(key=key, value=str(value))

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
            hits = tuple(
                Hit(k, limit, c.cost)
                for c in checked
                for k, limit in zip(c.keys, c.limits, strict=True)
            )
            plan = (checked, hits)
            if len(key) <= _MAX_PLANNED_REQUEST:
                if len(self._plans) >= _MAX_PLANS:
                    self._plans.clear()
                self._plans[key] = plan
        return plan

    def _match(self, config: RateLimitConfig, domain: str, shape: _Shape) -> tuple[_Checked, ...]:
        return match_descriptors(
            config, domain, shape, near=self._near_threshold, quota_mode=self.quota_mode
        )

    def _near_threshold(self, requests_per_unit: int) -> int:
        """floor(limit x ratio) in float32, as upstream computes it (so 0.8 of 10 is 8)."""
        return min(requests_per_unit, math.floor(_f32(_f32(requests_per_unit) * self._ratio32)))

    def _status(
        self,
        domain: str,
        c: _Checked,
        decisions: Sequence[Decision],
        status: rls_pb2.RateLimitResponse.DescriptorStatus,
    ) -> None:
        """Fill ``status`` (code OK) for one descriptor and count its hits."""
        if c.unlimited:
            status.limit_remaining = MAX_UINT32
            return
        if not decisions:
            return
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
        limit, decision, near_at = c.limits[pick], decisions[pick], c.near[pick]
        total, _, over, near, shadow, allowed = self._counters_for(domain, c.metric_key)
        cost, rpu, used = c.cost, limit.requests_per_unit, decision.used
        if denied:
            total(cost)
            # upstream's split: hits past the limit are over; those between the near threshold
            # and the limit, when this hit crossed it, are near
            if used < 0 or used - cost >= rpu:
                over_hits = cost
            else:
                over_hits = used - rpu
                near(rpu - max(near_at, used - cost))
            over(over_hits)
            if c.shadow:
                shadow(over_hits)
            else:
                status.code = OVER_LIMIT
        else:
            allowed(cost)  # total and within
            if used < 0:
                used = rpu - decision.remaining
            if used > near_at:
                near(cost if used - cost >= near_at else used - near_at)
        current = status.current_limit
        if limit.name:
            current.name = limit.name
        current.requests_per_unit = rpu
        current.unit = _UNIT[limit.unit]
        status.limit_remaining = min(decision.remaining, MAX_UINT32)
        reset = status.duration_until_reset
        if limit.algorithm is Algorithm.FIXED_WINDOW:  # whole seconds, as upstream
            reset.seconds = -(-decision.reset_ms // 1000)
        else:
            reset.seconds, ms = divmod(decision.reset_ms, 1000)
            reset.nanos = ms * 1_000_000

    def _counters_for(self, domain: str, metric_key: str) -> tuple[Callable[[float], None], ...]:
        """The descriptor's total, within, over, near and shadow counters (queued, see
        legation._prom), then one queued update moving total and within together (an allowed
        hit, the common case: one queue entry instead of two)."""
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

            found = (*(incrementer(c) for c in children), queued(allowed))
            if len(self._counters) < 100_000:  # bounded, whatever detailed_metric lets in
                self._counters[(domain, metric_key)] = found
        return found
