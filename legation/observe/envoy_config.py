"""The Envoy side of golden metrics: the HTTP connection manager's access log, and the cluster
of the access-log service it streams to.

:func:`access_log` is one ``envoy.access_loggers.http_grpc`` entry for an HCM's ``access_log``
list. Its ``log_name`` tells the aggregator which side of a proxy logged the request: give each
listener its own (``inbound`` / ``outbound`` / ``gateway``, the listener names of
:mod:`legation.translate._names`); entries logged as ``inbound`` count for the proxy only.

The entry Envoy sends carries the request's path, authority, user agent and addresses, and
request or response headers only when listed here. Credentials never are: a header in
:data:`SENSITIVE_HEADERS` is refused with :class:`ObserveError` (code ``sensitive_header``).
"""

from __future__ import annotations

from collections.abc import Iterable

from envoy.config.accesslog.v3 import accesslog_pb2
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import config_source_pb2
from envoy.extensions.access_loggers.grpc.v3 import als_pb2

from legation._proto import envoy_grpc, milliseconds, pack
from legation.envoy_grpc import grpc_cluster
from legation.errors import LegationError

__all__ = [
    "ACCESS_LOGGER",
    "ALS_CLUSTER",
    "SENSITIVE_HEADERS",
    "ObserveError",
    "access_log",
    "als_cluster",
]

ACCESS_LOGGER = "envoy.access_loggers.http_grpc"
ALS_CLUSTER = "legation_accesslog"
"""The cluster name the control plane gives the access-log service."""

SENSITIVE_HEADERS = frozenset(
    {
        "authorization",
        "proxy-authorization",
        "cookie",
        "set-cookie",
        "x-api-key",
        "x-auth-token",
        "x-csrf-token",
        "x-xsrf-token",
    }
)
"""Headers that carry credentials: never configured into an access-log entry."""


class ObserveError(LegationError):
    code = "observe_error"


def access_log(
    log_name: str,
    *,
    cluster: str = ALS_CLUSTER,
    flush_interval_ms: int = 1000,
    buffer_size_bytes: int = 16384,
    request_headers: Iterable[str] = (),
    response_headers: Iterable[str] = (),
) -> accesslog_pb2.AccessLog:
    """An HCM access log streaming every request to the access-log service behind ``cluster``.

    Envoy buffers entries per worker and sends a batch when ``buffer_size_bytes`` fill up or
    every ``flush_interval_ms``, so the service sees each request at most about that late, and
    one gRPC message carries many entries. ``request_headers`` / ``response_headers`` are added
    to each entry; credentials are refused (see :data:`SENSITIVE_HEADERS`)."""
    req = _checked(request_headers, "request_headers")
    resp = _checked(response_headers, "response_headers")
    config = als_pb2.HttpGrpcAccessLogConfig(
        common_config=als_pb2.CommonGrpcAccessLogConfig(
            log_name=log_name,
            grpc_service=envoy_grpc(cluster),
            transport_api_version=config_source_pb2.V3,
            buffer_flush_interval=milliseconds(flush_interval_ms),
        ),
        additional_request_headers_to_log=req,
        additional_response_headers_to_log=resp,
    )
    config.common_config.buffer_size_bytes.value = buffer_size_bytes
    return accesslog_pb2.AccessLog(name=ACCESS_LOGGER, typed_config=pack(config))


def als_cluster(host: str, port: int, *, name: str = ALS_CLUSTER) -> cluster_pb2.Cluster:
    """The access-log service's cluster: static, HTTP/2 (one connection per Envoy worker)."""
    return grpc_cluster(name, [(host, port)])


def _checked(headers: Iterable[str], field: str) -> list[str]:
    out = []
    for h in headers:
        name = h.strip().lower()
        if name in SENSITIVE_HEADERS:
            raise ObserveError(
                f"access log {field}: {h!r} carries credentials and is never logged",
                code="sensitive_header",
            )
        out.append(name)
    return out
