"""Envoy-side wiring for the ext_authz service, as protobufs the mesh translation reuses.

* :func:`http_filter` -- the ``envoy.filters.http.ext_authz`` HttpFilter calling our gRPC cluster,
  fail closed (``failure_mode_allow: false``), transport API v3, optionally with the request body.
* :func:`per_route` -- the route's ``ExtAuthzPerRoute``: the policy and checks travel in
  ``context_extensions``; ``disabled=True`` for routes that need no check.
* :func:`grpc_cluster` -- the HTTP/2 cluster pointing at the service.
"""

from __future__ import annotations

from collections.abc import Sequence

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2, grpc_service_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.extensions.filters.http.ext_authz.v3 import ext_authz_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from envoy.type.v3 import http_status_pb2
from google.protobuf import any_pb2

FILTER_NAME = "envoy.filters.http.ext_authz"
_HTTP_PROTOCOL_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


def http_filter(
    cluster: str,
    *,
    timeout_ms: int = 1000,
    failure_mode_allow: bool = False,
    status_on_error: int = 403,
    max_request_bytes: int = 0,
    allow_partial_message: bool = True,
    pack_as_bytes: bool = False,
    include_peer_certificate: bool = False,
) -> hcm_pb2.HttpFilter:
    """The ext_authz filter. ``max_request_bytes > 0`` sends up to that many body bytes; a larger
    body is cut (``allow_partial_message``, the policy sees ``truncated_body``) or refused 413."""
    config = ext_authz_pb2.ExtAuthz(
        transport_api_version=2,  # V3
        failure_mode_allow=failure_mode_allow,
        include_peer_certificate=include_peer_certificate,
    )
    config.grpc_service.envoy_grpc.cluster_name = cluster
    config.grpc_service.timeout.FromMilliseconds(timeout_ms)
    config.status_on_error.code = http_status_pb2.StatusCode.Value(
        http_status_pb2.StatusCode.Name(status_on_error)  # validates the status
    )
    if max_request_bytes > 0:
        config.with_request_body.max_request_bytes = max_request_bytes
        config.with_request_body.allow_partial_message = allow_partial_message
        config.with_request_body.pack_as_bytes = pack_as_bytes
    typed = any_pb2.Any()
    typed.Pack(config)
    return hcm_pb2.HttpFilter(name=FILTER_NAME, typed_config=typed)


def per_route(
    *, policy: str | None = None, checks: Sequence[str] = (), disabled: bool = False
) -> ext_authz_pb2.ExtAuthzPerRoute:
    """The route's ext_authz settings: ``disabled`` or the policy/checks it must pass."""
    if disabled:
        if policy or checks:
            raise ValueError("a route with ext_authz disabled cannot name a policy or checks")
        return ext_authz_pb2.ExtAuthzPerRoute(disabled=True)
    out = ext_authz_pb2.ExtAuthzPerRoute()
    ext = out.check_settings.context_extensions
    if policy:
        ext["policy"] = policy
    if checks:
        ext["checks"] = ",".join(checks)
    return out


def per_route_any(**kwargs: object) -> any_pb2.Any:
    """:func:`per_route` packed for ``typed_per_filter_config[FILTER_NAME]``."""
    typed = any_pb2.Any()
    typed.Pack(per_route(**kwargs))  # type: ignore[arg-type]
    return typed


def grpc_cluster(
    name: str, endpoints: Sequence[tuple[str, int]], *, connect_timeout_ms: int = 1000,
    max_concurrent_streams: int = 0,
) -> cluster_pb2.Cluster:
    """A STATIC HTTP/2 cluster for the service. Envoy opens one connection per worker; capping
    ``max_concurrent_streams`` makes it open more, which spreads load over SO_REUSEPORT workers."""
    cluster = cluster_pb2.Cluster(name=name, type=cluster_pb2.Cluster.STATIC)
    cluster.connect_timeout.FromMilliseconds(connect_timeout_ms)
    cla = endpoint_pb2.ClusterLoadAssignment(cluster_name=name)
    locality = cla.endpoints.add()
    for host, port in endpoints:
        lb = endpoint_components_pb2.LbEndpoint()
        lb.endpoint.address.CopyFrom(
            address_pb2.Address(socket_address=address_pb2.SocketAddress(address=host,
                                                                         port_value=port))
        )
        locality.lb_endpoints.append(lb)
    cluster.load_assignment.CopyFrom(cla)
    options = http_protocol_options_pb2.HttpProtocolOptions()
    h2 = options.explicit_http_config.http2_protocol_options
    if max_concurrent_streams:
        h2.max_concurrent_streams.value = max_concurrent_streams
    else:
        h2.SetInParent()
    typed = any_pb2.Any()
    typed.Pack(options)
    cluster.typed_extension_protocol_options[_HTTP_PROTOCOL_OPTIONS].CopyFrom(typed)
    return cluster


_ = grpc_service_pb2  # the GrpcService type must be registered for JSON conversion
