"""Clusters and their endpoints (EDS) for a mesh's services.

A service has one cluster for all its instances and one per subset. Its endpoints are the
instances' sidecar inbound ports (or the app itself when an instance has no sidecar), so moving an
instance is an EDS-only change. Circuit breakers, outlier detection, the load-balancing policy,
the retry budget and the upstream protocol are the service's and apply to all its clusters.
"""

from __future__ import annotations

from envoy.config.cluster.v3 import circuit_breaker_pb2, cluster_pb2, outlier_detection_pb2
from envoy.config.core.v3 import base_pb2, protocol_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2 as upstream_http_pb2
from envoy.type.v3 import percent_pb2
from google.protobuf import wrappers_pb2

from legation._proto import address, ads_source, duration, pack
from legation.config.capture import Capture
from legation.config.model import Endpoint, Service
from legation.translate._capture import endpoint_socket
from legation.translate._mtls import secure_cluster
from legation.translate._names import inbound_cluster, outbound_cluster

_LB = {
    "round_robin": cluster_pb2.Cluster.ROUND_ROBIN,
    "least_request": cluster_pb2.Cluster.LEAST_REQUEST,
    "random": cluster_pb2.Cluster.RANDOM,
    "ring_hash": cluster_pb2.Cluster.RING_HASH,
}
_HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


def outbound_clusters(
    service: Service, *, server_id: str | None = None, capture: Capture | None = None
) -> list[tuple[cluster_pb2.Cluster, endpoint_pb2.ClusterLoadAssignment]]:
    """The service's cluster and one per subset, each with its endpoints. With ``server_id``
    (the service's SPIFFE id; the mesh uses mTLS) they speak mTLS to the sidecars among them.
    With ``capture`` the sidecars' endpoints are their pods' (:func:`endpoint_socket`)."""
    out = []
    for subset in [None, *(s.name for s in service.subsets)]:
        name = outbound_cluster(service.name, subset)
        members = service.members(subset)
        addresses = [endpoint_socket(capture, service, e) for e in members]
        cluster, endpoints = _cluster(name, service), load_assignment(name, addresses)
        if server_id is not None:
            sidecars = [e.sidecar is not None for e in members]
            secure_cluster(cluster, endpoints, sidecars, server_id)
        out.append((cluster, endpoints))
    return out


def inbound_local_app(
    service: Service, endpoint: Endpoint
) -> tuple[cluster_pb2.Cluster, endpoint_pb2.ClusterLoadAssignment]:
    """A sidecar's cluster for its own app. Only the protocol and connect timeout apply: the
    caller's side already enforced the service's resilience settings."""
    name = inbound_cluster(service.name)
    cluster = cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.EDS,
        eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(eds_config=ads_source()),
        connect_timeout=duration(service.connect_timeout),
    )
    _set_protocol(cluster, service)
    return cluster, load_assignment(name, [(endpoint.host, endpoint.port)])


def load_assignment(
    cluster_name: str, addresses: list[tuple[str, int]]
) -> endpoint_pb2.ClusterLoadAssignment:
    return endpoint_pb2.ClusterLoadAssignment(
        cluster_name=cluster_name,
        endpoints=[
            endpoint_components_pb2.LocalityLbEndpoints(
                lb_endpoints=[
                    endpoint_components_pb2.LbEndpoint(
                        endpoint=endpoint_components_pb2.Endpoint(address=address(host, port))
                    )
                    for host, port in addresses
                ]
            )
        ],
    )


def _cluster(name: str, service: Service) -> cluster_pb2.Cluster:
    cluster = cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.EDS,
        eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(eds_config=ads_source()),
        connect_timeout=duration(service.connect_timeout),
        lb_policy=_LB[service.load_balancer.policy],
    )
    _set_protocol(cluster, service)
    thresholds = _thresholds(service)
    if thresholds is not None:
        cluster.circuit_breakers.CopyFrom(
            circuit_breaker_pb2.CircuitBreakers(thresholds=[thresholds])
        )
    od = service.outlier_detection
    if od is not None:
        cluster.outlier_detection.CopyFrom(
            outlier_detection_pb2.OutlierDetection(
                consecutive_5xx=wrappers_pb2.UInt32Value(value=od.consecutive_5xx),
                interval=duration(od.interval),
                base_ejection_time=duration(od.base_ejection_time),
                max_ejection_percent=wrappers_pb2.UInt32Value(value=round(od.max_ejection_percent)),
            )
        )
    return cluster


def _thresholds(service: Service) -> circuit_breaker_pb2.CircuitBreakers.Thresholds | None:
    cb = service.circuit_breakers
    budget = service.retries.budget if service.retries else None
    if cb is None and budget is None:
        return None
    t = circuit_breaker_pb2.CircuitBreakers.Thresholds(priority=base_pb2.DEFAULT)
    if cb is not None:
        for field in ("max_connections", "max_pending_requests", "max_requests", "max_retries"):
            value = getattr(cb, field)
            if value is not None:
                getattr(t, field).CopyFrom(wrappers_pb2.UInt32Value(value=value))
    if budget is not None:
        t.retry_budget.CopyFrom(
            circuit_breaker_pb2.CircuitBreakers.Thresholds.RetryBudget(
                budget_percent=percent_pb2.Percent(value=budget.percent),
                min_retry_concurrency=wrappers_pb2.UInt32Value(value=budget.min_concurrency),
            )
        )
    return t


def _set_protocol(cluster: cluster_pb2.Cluster, service: Service) -> None:
    """gRPC services speak HTTP/2 upstream; HTTP services keep Envoy's HTTP/1.1 default."""
    if service.protocol != "grpc":
        return
    options = upstream_http_pb2.HttpProtocolOptions(
        explicit_http_config=upstream_http_pb2.HttpProtocolOptions.ExplicitHttpConfig(
            http2_protocol_options=protocol_pb2.Http2ProtocolOptions()
        )
    )
    cluster.typed_extension_protocol_options[_HTTP_OPTIONS].CopyFrom(pack(options))
