"""JSON access-log lines written by the access-log service, for proxies whose mesh entry says
``to: service`` (:mod:`legation.config.accesslog`): one place collects every such proxy's lines.

:func:`line_of` turns one gRPC entry into the fields a proxy's own JSON log has
(:data:`legation.observe.envoy_config.JSON_FIELDS`, same names and meanings, plus ``node`` and
``listener``). The entry carries no trace id of its own: ``traceparent`` is the W3C header the
request left the proxy with (logged for these proxies, with the response's
``x-envoy-upstream-service-time``), and ``trace_id`` is read from it. The
path loses its query string here too.

:class:`JsonSink` appends each line to the file of its node, for node ids the mesh names only:
a stream that claims another node id writes nothing (the path template never sees a name that
did not come from the mesh file).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import IO, Any

from envoy.config.core.v3 import base_pb2
from envoy.data.accesslog.v3 import accesslog_pb2

__all__ = ["JsonSink", "line_of", "response_flags"]

log = logging.getLogger("legation.observe.jsonlines")

# Envoy's short names for its response flags (%RESPONSE_FLAGS%)
_FLAGS = {
    "failed_local_healthcheck": "LH",
    "no_healthy_upstream": "UH",
    "upstream_request_timeout": "UT",
    "local_reset": "LR",
    "upstream_remote_reset": "UR",
    "upstream_connection_failure": "UF",
    "upstream_connection_termination": "UC",
    "upstream_overflow": "UO",
    "no_route_found": "NR",
    "delay_injected": "DI",
    "fault_injected": "FI",
    "rate_limited": "RL",
    "unauthorized_details": "UAEX",
    "rate_limit_service_error": "RLSE",
    "downstream_connection_termination": "DC",
    "upstream_retry_limit_exceeded": "URX",
    "stream_idle_timeout": "SI",
    "invalid_envoy_request_headers": "IH",
    "downstream_protocol_error": "DPE",
    "upstream_max_stream_duration_reached": "UMSDR",
    "response_from_cache_filter": "RFCF",
    "no_filter_config_found": "NFCF",
    "duration_timeout": "DT",
    "upstream_protocol_error": "UPE",
    "no_cluster_found": "NC",
    "overload_manager": "OM",
    "dns_resolution_failure": "DF",
    "downstream_remote_reset": "DR",
}
_EXT_AUTHZ = "envoy.filters.http.ext_authz"
_PROTOCOLS = {1: "HTTP/1.0", 2: "HTTP/1.1", 3: "HTTP/2", 4: "HTTP/3"}
UPSTREAM_TIME = "x-envoy-upstream-service-time"
"""The response header the proxy's own lines read ``upstream_service_time_ms`` from."""


def response_flags(flags: accesslog_pb2.ResponseFlags) -> str:
    """``%RESPONSE_FLAGS%``'s text: the set flags' short names, comma-separated, or ``-``."""
    names = [_FLAGS.get(f.name, f.name) for f, _ in flags.ListFields()]
    return ",".join(names) or "-"


def _address(addr: base_pb2.Address) -> str | None:
    sock = addr.socket_address
    return f"{sock.address}:{sock.port_value}" if sock.address else None


def line_of(node_id: str, log_name: str, entry: accesslog_pb2.HTTPAccessLogEntry) -> dict[str, Any]:
    """One entry as the fields of a proxy's JSON access-log line."""
    common, req, resp = entry.common_properties, entry.request, entry.response
    traceparent = req.request_headers.get("traceparent") or None
    parts = traceparent.split("-") if traceparent else []
    meta = common.metadata.filter_metadata.get(_EXT_AUTHZ)
    decision = meta.fields.get("decision_id") if meta is not None else None
    method = base_pb2.RequestMethod.Name(req.request_method) if req.request_method else None
    return {
        "node": node_id,
        "listener": log_name,
        "start_time": common.start_time.ToJsonString() if common.HasField("start_time") else None,
        "request_id": req.request_id or None,
        "trace_id": parts[1] if len(parts) == 4 else None,
        "traceparent": traceparent,
        "method": method,
        "authority": req.authority or None,
        "path": (req.original_path or req.path).split("?", 1)[0] or None,
        "protocol": _PROTOCOLS.get(entry.protocol_version),
        "route": common.route_name or None,
        "upstream_cluster": common.upstream_cluster or None,
        "upstream_host": _address(common.upstream_remote_address),
        "response_code": resp.response_code.value,
        "response_flags": response_flags(common.response_flags),
        "response_code_details": resp.response_code_details or None,
        "upstream_service_time_ms": resp.response_headers.get(UPSTREAM_TIME) or None,
        "duration_ms": round(common.duration.ToNanoseconds() / 1e6)
        if common.HasField("duration")
        else None,
        "bytes_received": req.request_body_bytes,
        "bytes_sent": resp.response_body_bytes,
        "downstream_peer": _address(common.downstream_remote_address),
        "decision_id": decision.string_value if decision is not None else None,
    }


class JsonSink:
    """Append lines to ``paths[node_id]`` (opened on first use, kept open); nodes not in
    ``paths`` are not written. :meth:`swap` replaces the map (a reload), closing files no
    longer named."""

    def __init__(self, paths: Mapping[str, str]) -> None:
        self.paths = dict(paths)
        self._files: dict[str, IO[str]] = {}
        self.lines = 0

    def wants(self, node_id: str) -> bool:
        return node_id in self.paths

    def write(self, node_id: str, log_name: str, entries: Any) -> None:
        path = self.paths.get(node_id)
        if path is None:
            return
        out = self._files.get(path)
        if out is None:
            try:
                out = self._files[path] = open(path, "a", encoding="utf-8")
            except OSError as err:
                log.warning("cannot open the access log %s: %s", path, err)
                return
        text = "".join(json.dumps(line_of(node_id, log_name, e)) + "\n" for e in entries)
        out.write(text)
        out.flush()
        self.lines += len(entries)

    def swap(self, paths: Mapping[str, str]) -> None:
        self.paths = dict(paths)
        for path in [p for p in self._files if p not in self.paths.values()]:
            self._files.pop(path).close()

    def close(self) -> None:
        for out in self._files.values():
            out.close()
        self._files.clear()
