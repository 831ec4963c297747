"""The ``local`` failure mode: while the counter store is away, count in this process's memory.

:class:`LocalFallback` is a :class:`~legation.ratelimit.backends.Backend` made of two: the store
(Redis) and a :class:`~legation.ratelimit.backends.memory.MemoryBackend`. While the store answers,
every hit is counted there and the memory backend is not touched. When a call fails with
``backend_unavailable`` (an error, or no answer within the store's own ``timeout_ms``, which
stays the bound of every call), that request and the ones after it are decided by the memory
backend with the same limits, each divided by ``instances`` (the number of rate-limit service
processes expected to share the traffic, ``--workers`` included; default 1; rounded up so a
limit of 1 or more stays at least 1): with N instances each admitting limit/N, the mesh admits
about the limit. The limits are therefore per instance while the store is away, and roughly
hold instead of vanishing (``allow``) or refusing everything (``deny``). One warning is logged
when an outage starts and one when the store answers again.

Going back: after a failure the store is left alone for a backoff (``probe_interval``, doubled
after each failed probe up to ``max_probe_interval``). When it is due, one request (one at a
time, never a burst) tries the store; the others keep deciding locally meanwhile. The first
answer puts every request back on the store, so counting resumes there with no herd of
requests each waiting for a timeout. Counters kept in memory during an outage are not copied to
the store (the store's window carries on from what it had), nor the store's to memory; but a
counter the store had found over its limit stays refused in memory until the store said it could
pass (its over-limit cache, when it has one: ``cached_refusal``). Otherwise, during the second of
a switch a client can get up to the limit from each side.

Measured in the limiter's metrics: ``legation_ratelimit_failure_mode_total{action="local"}``
(requests decided in memory), ``..._backend_errors_total{code}`` (store calls that failed, probes
included) and ``legation_ratelimit_backend_available`` (the store's state as its last call found
it: 0 from a failure until a probe gets an answer).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Sequence

from legation.ratelimit.algorithms import Decision, Hit
from legation.ratelimit.backends import Backend
from legation.ratelimit.backends.memory import MemoryBackend, MemoryConfig
from legation.ratelimit.config import Limit
from legation.ratelimit.errors import RateLimitError
from legation.ratelimit.metrics import RateLimitMetrics

log = logging.getLogger(__name__)

LOCAL_MEMORY = MemoryConfig(max_keys=100_000, max_bytes=32 * 1024 * 1024)
"""Bounds of the in-memory counters used during an outage (an LRU, as the memory backend)."""


class LocalFallback:
    """See the module docstring. ``store`` is the backend wrapped (its ``close`` is ours)."""

    def __init__(
        self,
        store: Backend,
        *,
        metrics: RateLimitMetrics,
        instances: int = 1,
        probe_interval: float = 0.25,
        max_probe_interval: float = 1.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self._refusal: Callable[[str, int], Decision | None] | None = getattr(
            store, "cached_refusal", None
        )
        self.local = MemoryBackend(LOCAL_MEMORY)
        self.metrics = metrics
        self.instances = 1
        self._scaled: dict[Limit, Limit] = {}
        self.share_among(instances)
        self.probe_interval = probe_interval
        self.max_probe_interval = max_probe_interval
        self._monotonic = monotonic
        self._down = False
        self._probe_at = 0.0  # monotonic seconds: when the store may be tried again
        self._backoff = probe_interval
        self._probing = False

    @property
    def available(self) -> bool:
        """Whether hits are counted in the store (False: decided locally)."""
        return not self._down

    def __repr__(self) -> str:
        return f"LocalFallback({self.store!r}, instances={self.instances})"

    def share_among(self, instances: int) -> None:
        """Divide the limits among ``instances`` from now on (a reload may change it)."""
        if instances < 1:
            raise ValueError(f"instances: expected >= 1, got {instances}")
        if instances != self.instances:
            self.instances = instances
            self._scaled.clear()

    async def hit(self, hits: Sequence[Hit], now_ms: int) -> list[Decision]:
        if self._down and (self._probing or self._monotonic() < self._probe_at):
            return self._decide_locally(hits, now_ms)
        probe = self._down
        if probe:
            self._probing = True
        try:
            decisions = await self.store.hit(hits, now_ms)
        except RateLimitError as exc:
            if exc.code != "backend_unavailable":
                raise
            self.metrics.backend_errors.labels(exc.code).inc()
            if not self._down:  # one line per outage, not per request
                log.warning(
                    "rate-limit store failed, deciding in memory until it answers "
                    "(limits / %d): %s",
                    self.instances,
                    exc,
                )
            self._failed(probe)
            return self._decide_locally(hits, now_ms)
        finally:
            if probe:
                self._probing = False
        if probe:  # only a probe brings the store back: a call that started before a failure
            self._down = False  # and answered after it says nothing about the store now
            self._backoff = self.probe_interval
            log.warning("rate-limit store answers again: counting there")
        return decisions

    async def close(self) -> None:
        await self.store.close()
        await self.local.close()

    def _failed(self, probe: bool) -> None:
        """A store call failed: (re)start the backoff; a failed probe doubles it."""
        if probe:
            self._backoff = min(self._backoff * 2, self.max_probe_interval)
        elif not self._down:
            self._backoff = self.probe_interval
        self._down = True
        self._probe_at = self._monotonic() + self._backoff

    def _decide_locally(self, hits: Sequence[Hit], now_ms: int) -> list[Decision]:
        self.metrics.failure_mode.labels("local").inc()
        local, refusal = self.local, self._refusal
        out = []
        for h in hits:
            refused = refusal(h.key, now_ms) if refusal is not None else None
            out.append(
                refused
                if refused is not None
                else local.hit_one(Hit(h.key, self._share(h.limit), h.cost), now_ms)
            )
        return out

    def _share(self, limit: Limit) -> Limit:
        """``limit`` divided among the instances (rounded up; 0 stays 0)."""
        if self.instances == 1:
            return limit
        scaled = self._scaled.get(limit)
        if scaled is None:
            if len(self._scaled) >= 4096:  # limits come from config: a reload may bring new ones
                self._scaled.clear()
            per = math.ceil(limit.requests_per_unit / self.instances)
            scaled = self._scaled[limit] = dataclasses.replace(limit, requests_per_unit=per)
        return scaled
