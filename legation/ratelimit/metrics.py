"""Prometheus metrics for the rate-limit service, in a registry the caller chooses.

Per descriptor (labels ``domain`` and ``descriptor``, the envoyproxy/ratelimit stat key such as
``messaging.message_type_marketing.to_number``), counted in hits (a request's cost):

* ``legation_ratelimit_total_hits_total``, ``..._within_limit_total``, ``..._over_limit_total``,
  ``..._near_limit_total`` (hits past ``near_limit_ratio`` of the limit; a ``hits_addend`` that
  crosses a threshold is split between near and over as envoyproxy/ratelimit splits it),
  ``..._shadow_mode_total`` (over the limit, let through by shadow mode, per rule or global).

Service-wide: ``legation_ratelimit_global_shadow_mode_total`` (requests that would have been
refused, answered OK by the service-wide shadow mode; their statuses still say OVER_LIMIT),
``legation_ratelimit_config_reloads_total{result="success|error"}``,
``legation_ratelimit_backend_errors_total{code}`` and
``legation_ratelimit_failure_mode_total{action="allow|deny|local"}`` (requests decided by the
failure mode while the store was unreachable; ``local``: decided by in-memory counters, see
:mod:`.fallback`), and for a store behind the network (Redis)
``legation_ratelimit_backend_round_trips_total`` (pipelines sent),
``legation_ratelimit_backend_local_cache_hits_total`` (hits answered by the over-limit cache) and
the gauge ``legation_ratelimit_backend_available`` (1 when the store answered its last call, 0
after a failure until it answers again). Those are read from the backend when scraped, so they
cost a request nothing.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator

from prometheus_client import REGISTRY, CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from legation._prom import BatchedCounter

# keyed by id(); the registry is kept alive alongside so its id cannot be reused
_BY_REGISTRY: dict[int, tuple[CollectorRegistry, RateLimitMetrics]] = {}


class RateLimitMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        labels = ["domain", "descriptor"]

        def counter(
            name: str, doc: str, names: list[str], kind: type[Counter] = Counter
        ) -> Counter:
            return kind(f"legation_ratelimit_{name}", doc, names, registry=registry)

        # per descriptor, on every request: updates queued (legation._prom)
        b = BatchedCounter
        self.total_hits = counter("total_hits", "Hits checked against a limit", labels, b)
        self.within_limit = counter("within_limit", "Hits within the limit", labels, b)
        self.over_limit = counter("over_limit", "Hits over the limit (and refused)", labels, b)
        self.near_limit = counter("near_limit", "Allowed hits past the near-limit ratio", labels, b)
        self.shadow_mode = counter(
            "shadow_mode", "Hits over the limit let through by shadow mode", labels, b
        )
        self.global_shadow_mode = counter(
            "global_shadow_mode",
            "Requests over the limit answered OK by the global shadow mode",
            [],
        )
        self.config_reloads = counter("config_reloads", "Config loads by result", ["result"])
        self.backend_errors = counter("backend_errors", "Counter store failures", ["code"])
        self.failure_mode = counter(
            "failure_mode", "Requests decided by the failure mode", ["action"]
        )
        self._backends = _BackendCollector()
        registry.register(self._backends)

    def track_backend(self, backend: object) -> None:
        """Expose ``backend.round_trips``, ``backend.cache_hits`` and ``backend.available``, where
        it has them."""
        if hasattr(backend, "round_trips"):
            self._backends.backends.add(backend)

    @classmethod
    def for_registry(cls, registry: CollectorRegistry | None = None) -> RateLimitMetrics:
        """One set of metrics per registry (the default one when None), created on first use."""
        registry = registry if registry is not None else REGISTRY
        found = _BY_REGISTRY.get(id(registry))
        if found is None:
            found = _BY_REGISTRY[id(registry)] = (registry, cls(registry))
        return found[1]


class _BackendCollector(Collector):
    """Sums the counters that network backends keep as plain ints, at scrape time."""

    def __init__(self) -> None:
        self.backends: weakref.WeakSet[object] = weakref.WeakSet()

    def collect(self) -> Iterator[Metric]:
        live = list(self.backends)
        for name, attr, doc in (
            ("backend_round_trips", "round_trips", "Round trips to the counter store"),
            ("backend_local_cache_hits", "cache_hits", "Hits answered by the over-limit cache"),
        ):
            family = CounterMetricFamily(f"legation_ratelimit_{name}", doc)
            family.add_metric([], sum(getattr(b, attr, 0) for b in live))
            yield family
        states = [bool(b.available) for b in live if hasattr(b, "available")]
        if states:
            gauge = GaugeMetricFamily(
                "legation_ratelimit_backend_available",
                "1 when the counter store answered its last call, else 0",
            )
            gauge.add_metric([], float(all(states)))
            yield gauge
