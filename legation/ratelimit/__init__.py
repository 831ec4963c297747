"""Rate limiting: ``envoy.service.ratelimit.v3.RateLimitService`` for Envoy's ratelimit filter.

* :mod:`.config` loads envoyproxy/ratelimit YAML unchanged, plus our additions (several limits per
  descriptor, an algorithm per limit); :mod:`.watch` reloads it, keeping the last good config.
* :mod:`.algorithms` holds the counting rules (fixed window, sliding window, token bucket) shared by
  the backends; :mod:`.backends` are plugins (``memory``, ``redis``) behind one small Protocol.
* :mod:`.service` is the grpc.aio servicer and ``start_server``;
  :mod:`.metrics` the Prometheus side.
* :mod:`.envoy_filter` builds the Envoy HTTP filter, route actions and the gRPC cluster for it.
"""

__all__ = [
    "algorithms",
    "backends",
    "config",
    "envoy_filter",
    "errors",
    "fallback",
    "limiter",
    "metrics",
    "service",
    "watch",
]
