"""Prometheus metrics for the rate-limit service, in a registry the caller chooses.

Per descriptor (labels ``domain`` and ``descriptor``, the envoyproxy/ratelimit stat key such as
``messaging.message_type_marketing.to_number``), counted in hits (a request's cost):

* ``legation_ratelimit_total_hits_total``, ``..._within_limit_total``, ``..._over_limit_total``,
  ``..._near_limit_total`` (allowed, but past ``near_limit_ratio`` of the limit),
  ``..._shadow_mode_total`` (over the limit, let through by shadow mode, per rule or global).

Service-wide: ``legation_ratelimit_config_reloads_total{result="success|error"}``,
``legation_ratelimit_backend_errors_total{code}`` and
``legation_ratelimit_failure_mode_total{action="allow|deny"}`` (requests decided by the failure
mode while the store was unreachable).
"""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry, Counter

# keyed by id(); the registry is kept alive alongside so its id cannot be reused
_BY_REGISTRY: dict[int, tuple[CollectorRegistry, RateLimitMetrics]] = {}


class RateLimitMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        labels = ["domain", "descriptor"]

        def counter(name: str, doc: str, names: list[str]) -> Counter:
            return Counter(f"legation_ratelimit_{name}", doc, names, registry=registry)

        self.total_hits = counter("total_hits", "Hits checked against a limit", labels)
        self.within_limit = counter("within_limit", "Hits within the limit", labels)
        self.over_limit = counter("over_limit", "Hits over the limit (and refused)", labels)
        self.near_limit = counter("near_limit", "Allowed hits past the near-limit ratio", labels)
        self.shadow_mode = counter("shadow_mode", "Hits over the limit let through by shadow mode",
                                   labels)
        self.config_reloads = counter("config_reloads", "Config loads by result", ["result"])
        self.backend_errors = counter("backend_errors", "Counter store failures", ["code"])
        self.failure_mode = counter("failure_mode", "Requests decided by the failure mode",
                                    ["action"])

    @classmethod
    def for_registry(cls, registry: CollectorRegistry | None = None) -> RateLimitMetrics:
        """One set of metrics per registry (the default one when None), created on first use."""
        registry = registry if registry is not None else REGISTRY
        found = _BY_REGISTRY.get(id(registry))
        if found is None:
            found = _BY_REGISTRY[id(registry)] = (registry, cls(registry))
        return found[1]
