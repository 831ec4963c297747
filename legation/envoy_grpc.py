"""The Envoy cluster every request-path service is called through: static, HTTP/2.

Envoy opens one HTTP/2 connection per worker thread to a gRPC cluster and multiplexes every call
on it, so service processes sharing one port (SO_REUSEPORT) may get nothing: the kernel hands
each connection to one process. A service's workers are therefore one endpoint each (worker i on
``port + 100 i``, :func:`legation.translate._hops.worker_endpoints`); capping
``max_concurrent_streams`` makes Envoy open more connections, which the kernel spreads only by
chance (``bench/workers.py`` measures the three).
"""

from __future__ import annotations

from collections.abc import Sequence

from envoy.config.cluster.v3 import cluster_pb2, outlier_detection_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2

from legation._proto import address, milliseconds, pack

_HTTP_PROTOCOL_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


def grpc_cluster(
    name: str,
    endpoints: Sequence[tuple[str, int]],
    *,
    connect_timeout_ms: int = 1000,
    max_concurrent_streams: int | None = None,
) -> cluster_pb2.Cluster:
    """A STATIC cluster of ``endpoints`` (host, port) speaking HTTP/2."""
    locality = endpoint_components_pb2.LocalityLbEndpoints(
        lb_endpoints=[
            endpoint_components_pb2.LbEndpoint(
                endpoint=endpoint_components_pb2.Endpoint(address=address(host, port))
            )
            for host, port in endpoints
        ]
    )
    cluster = cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.STATIC,
        load_assignment=endpoint_pb2.ClusterLoadAssignment(cluster_name=name, endpoints=[locality]),
        connect_timeout=milliseconds(connect_timeout_ms),
    )
    options = http_protocol_options_pb2.HttpProtocolOptions()
    h2 = options.explicit_http_config.http2_protocol_options
    h2.SetInParent()
    if max_concurrent_streams:
        h2.max_concurrent_streams.value = max_concurrent_streams
    cluster.typed_extension_protocol_options[_HTTP_PROTOCOL_OPTIONS].CopyFrom(pack(options))
    if len(endpoints) > 1:
        eject_dead_workers(cluster.outlier_detection)
    return cluster


def eject_dead_workers(detection: outlier_detection_pb2.OutlierDetection) -> None:
    """Several endpoints are one service's workers: one that refuses a connection (its process
    died, its supervisor is restarting it) is taken out of the round robin at its first such
    failure, for a second (longer if it fails again), so the calls go to the others meanwhile.
    Only failures of Envoy's own connection count (``split_external_local_origin_errors``);
    answers never eject a worker, and at most half of them are out at once."""
    detection.split_external_local_origin_errors = True
    detection.consecutive_local_origin_failure.value = 1
    detection.enforcing_consecutive_local_origin_failure.value = 100
    detection.enforcing_consecutive_5xx.value = 0
    detection.enforcing_success_rate.value = 0
    detection.enforcing_local_origin_success_rate.value = 0
    detection.interval.FromMilliseconds(1000)
    detection.base_ejection_time.FromMilliseconds(1000)
    detection.max_ejection_time.FromMilliseconds(10000)
    detection.max_ejection_percent.value = 50
