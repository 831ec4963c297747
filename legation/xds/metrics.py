"""Prometheus metrics of the xDS server, in a registry of their own unless one is given."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class XdsMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.pushes = Counter("legation_xds_pushes", "xDS responses sent", ["type"], registry=r)
        self.push_bytes = Counter(
            "legation_xds_push_bytes", "Bytes of xDS responses sent", ["type"], registry=r
        )
        self.acks = Counter("legation_xds_acks", "xDS responses ACKed", ["type"], registry=r)
        self.nacks = Counter("legation_xds_nacks", "xDS responses rejected", ["type"], registry=r)
        self.auth_refused = Counter(
            "legation_xds_auth_refused",
            "xDS calls refused: no or bad credential, or a node id other than the credential's",
            ["reason"],
            registry=r,
        )
        self.connected = Gauge(
            "legation_xds_connected_proxies", "Proxies with an open xDS stream", registry=r
        )
