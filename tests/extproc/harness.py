"""Test harness: the ext_proc service on its own thread, a real Envoy built with envoy_filter."""

from __future__ import annotations

import http.client
import json
from dataclasses import dataclass
from typing import Any

from google.protobuf.json_format import MessageToDict

from legation.extproc import envoy_filter
from legation.extproc.chain import Chain
from legation.extproc.service import Settings, start_server
from tests import loop
from tests.envoy_stack import static_bootstrap
from tests.envoy_stack import static_cluster as static_cluster  # used as harness.static_cluster


class ServiceThread(loop.ServiceThread):
    """``start_server(settings)`` on a private event loop, so sync tests can drive Envoy."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(lambda: start_server(settings))
        self.settings = settings


def to_dict(message: Any) -> dict[str, Any]:
    """A protobuf as plain JSON-able dicts (MessageToDict may return OrderedDicts)."""
    return json.loads(json.dumps(MessageToDict(message, preserving_proto_field_name=True)))


def route(
    prefix: str,
    cluster: str,
    chain: Chain | None,
    *,
    headers: dict[str, str] | None = None,
    add_request_headers: dict[str, str] | None = None,
    http_filter: str | None = None,
    **per_route: Any,
) -> dict[str, Any]:
    """A route calling the gRPC filter with ``chain`` or, with ``http_filter``, enabling that
    HTTP-transport filter (which names its chain itself) instead."""
    match: dict[str, Any] = {"prefix": prefix}
    if headers:
        match["headers"] = [{"name": k, "string_match": {"exact": v}} for k, v in headers.items()]
    per_filter = (
        {http_filter: to_dict(envoy_filter.enabled_here())}
        if http_filter is not None
        else {
            name: to_dict(cfg)
            for name, cfg in envoy_filter.typed_per_filter_config(chain, **per_route).items()
        }
    )
    out: dict[str, Any] = {
        "match": match,
        "route": {"cluster": cluster, "timeout": "10s"},
        "typed_per_filter_config": per_filter,
    }
    if add_request_headers:
        out["request_headers_to_add"] = [
            {"header": {"key": k, "value": v}} for k, v in add_request_headers.items()
        ]
    return out


def bootstrap(
    *,
    listener_port: int,
    admin_port: int,
    service_port: int,
    routes: list[dict[str, Any]],
    clusters: list[dict[str, Any]],
    message_timeout: float,
) -> dict[str, Any]:
    return static_bootstrap(
        listen_port=listener_port,
        admin_port=admin_port,
        routes=routes,
        http_filters=[
            to_dict(envoy_filter.http_filter("extproc", message_timeout=message_timeout)),
        ],
        clusters=[
            to_dict(envoy_filter.grpc_cluster("extproc", "127.0.0.1", service_port)),
            *clusters,
        ],
    )


def http_bootstrap(
    *,
    listener_port: int,
    admin_port: int,
    routes: list[dict[str, Any]],
    clusters: list[dict[str, Any]],
    filters: list[tuple[str, str, Chain]],
    message_timeout: float,
) -> dict[str, Any]:
    """An Envoy calling ext_proc over its HTTP transport: one filter per ``(name, cluster,
    chain)``, each disabled unless a route enables it (:func:`route` with ``http_filter``)."""
    return static_bootstrap(
        listen_port=listener_port,
        admin_port=admin_port,
        routes=routes,
        http_filters=[
            to_dict(
                envoy_filter.http_transport_filter(
                    name, cluster, chain, message_timeout=message_timeout
                )
            )
            for name, cluster, chain in filters
        ],
        clusters=clusters,
    )


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def request(
    port: int,
    path: str,
    *,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
) -> Response:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
        return Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, data)
    finally:
        conn.close()
