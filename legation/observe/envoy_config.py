"""The Envoy side of golden metrics: the HTTP connection manager's access log, and the cluster
of the access-log service it streams to.

:func:`access_log` is one ``envoy.access_loggers.http_grpc`` entry for an HCM's ``access_log``
list. Its ``log_name`` tells the aggregator which side of a proxy logged the request: give each
listener its own (``inbound`` / ``outbound`` / ``gateway``, the listener names of
:mod:`legation.translate._names`); entries logged as ``inbound`` count for the proxy only.

The entry Envoy sends carries the request's path, authority, user agent and addresses, and
request or response headers only when listed here. Credentials never are: a header in
:data:`SENSITIVE_HEADERS` is refused with :class:`ObserveError` (code ``sensitive_header``).

:func:`json_log` is the JSON-lines access log (to a file or Envoy's stdout) with
:data:`JSON_FIELDS`: ids to join a line to its trace and its authorization decision, where the
request went and how it ended. The path is logged without its query string (a token may travel
there), and no header that can carry a credential is ever a field.
"""

from __future__ import annotations

from collections.abc import Iterable

from envoy.config.accesslog.v3 import accesslog_pb2
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import config_source_pb2
from envoy.config.core.v3 import substitution_format_string_pb2 as fmt_pb2
from envoy.extensions.access_loggers.file.v3 import file_pb2
from envoy.extensions.access_loggers.grpc.v3 import als_pb2
from envoy.extensions.access_loggers.stream.v3 import stream_pb2
from google.protobuf import struct_pb2

from legation._proto import envoy_grpc, milliseconds, pack
from legation.envoy_grpc import grpc_cluster
from legation.errors import LegationError

__all__ = [
    "ACCESS_LOGGER",
    "ALS_CLUSTER",
    "JSON_FIELDS",
    "SENSITIVE_HEADERS",
    "ObserveError",
    "access_log",
    "als_cluster",
    "json_log",
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


JSON_FIELDS: dict[str, str] = {
    "start_time": "%START_TIME%",
    "request_id": "%REQ(X-REQUEST-ID)%",
    "trace_id": "%TRACE_ID%",
    "traceparent": "%REQ(TRACEPARENT)%",
    "method": "%REQ(:METHOD)%",
    "authority": "%REQ(:AUTHORITY)%",
    "path": "%PATH(NQ:ORIG_OR_PATH)%",
    "protocol": "%PROTOCOL%",
    "route": "%ROUTE_NAME%",
    "upstream_cluster": "%UPSTREAM_CLUSTER%",
    "upstream_host": "%UPSTREAM_HOST%",
    "response_code": "%RESPONSE_CODE%",
    "response_flags": "%RESPONSE_FLAGS%",
    "response_code_details": "%RESPONSE_CODE_DETAILS%",
    "duration_ms": "%DURATION%",
    "upstream_service_time_ms": "%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)%",
    "bytes_received": "%BYTES_RECEIVED%",
    "bytes_sent": "%BYTES_SENT%",
    "downstream_peer": "%DOWNSTREAM_REMOTE_ADDRESS%",
    "decision_id": "%DYNAMIC_METADATA(envoy.filters.http.ext_authz:decision_id)%",
}
"""The JSON access log's fields: Envoy command operators. ``trace_id`` is the active span's
(set when the proxy traces), ``traceparent`` the W3C header as it arrived; ``decision_id`` is the
id Legation's ext_authz service gave the request's decision (in the filter's dynamic metadata).
Each line also carries ``node`` and ``listener`` (see :func:`json_log`)."""


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


def json_log(node_id: str, listener: str, *, to: str, path: str = "") -> accesslog_pb2.AccessLog:
    """A JSON-lines access log of :data:`JSON_FIELDS` plus the proxy's ``node`` and
    ``listener``, written to ``path`` (``to="file"``) or Envoy's stdout (``to="stdout"``)."""
    fields = struct_pb2.Struct()
    # literal values: a '%' would start a command operator
    fields.update({"node": node_id.replace("%", "%%"), "listener": listener.replace("%", "%%")})
    fields.update(JSON_FIELDS)
    log_format = fmt_pb2.SubstitutionFormatString(json_format=fields)
    if to == "file":
        if not path:
            raise ObserveError("a file access log needs a path", code="invalid_config")
        return accesslog_pb2.AccessLog(
            name="envoy.access_loggers.file",
            typed_config=pack(file_pb2.FileAccessLog(path=path, log_format=log_format)),
        )
    if to == "stdout":
        return accesslog_pb2.AccessLog(
            name="envoy.access_loggers.stdout",
            typed_config=pack(stream_pb2.StdoutAccessLog(log_format=log_format)),
        )
    raise ObserveError(f"no access log destination {to!r}", code="invalid_config")


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
