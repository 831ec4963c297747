"""The HTTP call-out: Envoy's ext_authz in HTTP mode, answered by the same checks as gRPC.

``contract`` (what the filter and the server agree on), ``request`` (HTTP call -> CheckRequest),
``answer`` (Decision -> HTTP answer), ``_http`` (the connection, httptools), ``server``
(start/stop), ``envoy_filter`` (the filter, per-route override and cluster as protobufs).
"""

__all__ = ["answer", "contract", "envoy_filter", "request", "server"]
