"""Envoy-side wiring for the ext_authz service, as protobufs the mesh translation reuses.

* :func:`http_filter` -- the ``envoy.filters.http.ext_authz`` HttpFilter calling our gRPC cluster,
  fail closed (``failure_mode_allow: false``), transport API v3, optionally with the request body,
  and ``validate_mutations: true``: Envoy refuses (denies with ``status_on_error``) a response whose
  header mutations are invalid, a second line behind the service's own header checks.
* :func:`per_route` -- the route's ``ExtAuthzPerRoute``: the policy and checks travel in
  ``context_extensions``; ``disabled=True`` for routes that need no check.
* :func:`grpc_cluster` -- the HTTP/2 cluster pointing at the service.
"""

from __future__ import annotations

from collections.abc import Sequence

from envoy.config.cluster.v3 import cluster_pb2
from envoy.extensions.filters.http.ext_authz.v3 import ext_authz_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.type.v3 import http_status_pb2
from google.protobuf import any_pb2

from legation import envoy_grpc
from legation._proto import envoy_grpc as grpc_service
from legation._proto import http_filter as _http_filter
from legation._proto import milliseconds, pack

FILTER_NAME = "envoy.filters.http.ext_authz"


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
        validate_mutations=True,
        grpc_service=grpc_service(cluster, timeout=milliseconds(timeout_ms)),
    )
    config.status_on_error.code = http_status_pb2.StatusCode.Value(
        http_status_pb2.StatusCode.Name(status_on_error)  # validates the status
    )
    if max_request_bytes > 0:
        config.with_request_body.max_request_bytes = max_request_bytes
        config.with_request_body.allow_partial_message = allow_partial_message
        config.with_request_body.pack_as_bytes = pack_as_bytes
    return _http_filter(FILTER_NAME, config)


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
    return pack(per_route(**kwargs))  # type: ignore[arg-type]


def grpc_cluster(
    name: str,
    endpoints: Sequence[tuple[str, int]],
    *,
    connect_timeout_ms: int = 1000,
    max_concurrent_streams: int = 0,
) -> cluster_pb2.Cluster:
    """A STATIC HTTP/2 cluster for the service (see :mod:`legation.envoy_grpc`)."""
    return envoy_grpc.grpc_cluster(
        name,
        endpoints,
        connect_timeout_ms=connect_timeout_ms,
        max_concurrent_streams=max_concurrent_streams,
    )
