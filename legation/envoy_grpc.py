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

from envoy.config.cluster.v3 import cluster_pb2
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
    return cluster
