"""A real Envoy in front of a demo upstream with the rate-limit filter (or Envoy's native local
rate limit), and the service on its own event loop thread. Used by the integration tests and by
bench/ratelimit.py."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

from envoy.config.route.v3 import route_components_pb2 as route_pb2
from google.protobuf.json_format import MessageToDict

from legation.ratelimit import envoy_filter as ef
from legation.ratelimit.service import Settings, start_server
from tests import loop
from tests.envoy_stack import static_bootstrap, static_cluster

RLS_CLUSTER = "ratelimit"


class ServiceThread(loop.ServiceThread):
    """``start_server(settings)`` on a private event loop in a daemon thread."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(lambda: start_server(settings), stop=lambda s: s.stop(None))
        self.settings = settings


def bootstrap(
    *,
    listen_port: int,
    admin_port: int,
    upstream_port: int,
    routes: Sequence[tuple[str, Sequence[ef.DescriptorSpec]]] = (),
    rls_port: int | None = None,
    domain: str = "edge",
    failure_mode: str = "allow",
    local_limit: int | None = None,
) -> dict[str, Any]:
    """A static bootstrap: ``routes`` are (path prefix, descriptor specs), each sending one
    descriptor; ``rls_port`` adds the ratelimit filter, ``local_limit`` Envoy's local one."""
    filters = []
    if rls_port is not None:
        filters.append(
            ef.rate_limit_filter(
                domain=domain, cluster=RLS_CLUSTER, failure_mode=failure_mode, timeout_ms=1000
            )
        )
    if local_limit is not None:
        filters.append(ef.local_rate_limit_filter(stat_prefix="local", max_tokens=local_limit))
    vhost = route_pb2.VirtualHost(name="all", domains=["*"])
    for prefix, specs in [*routes, ("/", ())]:
        route = vhost.routes.add()
        route.match.prefix = prefix
        route.route.cluster = "upstream"
        if specs:
            route.route.rate_limits.extend(ef.route_rate_limits(specs))
    clusters = [static_cluster("upstream", upstream_port)]  # the demo upstream speaks HTTP/1.1
    if rls_port is not None:
        clusters.append(_dict(ef.rate_limit_cluster(RLS_CLUSTER, "127.0.0.1", rls_port)))
    return static_bootstrap(
        listen_port=listen_port,
        admin_port=admin_port,
        routes=_dict(vhost)["routes"],
        http_filters=[_dict(f) for f in filters],
        clusters=clusters,
    )


def get(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str]]:
    """GET through Envoy: (status, lower-cased response headers); 4xx/5xx are answers too."""
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            resp.read()
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}
    except urllib.error.HTTPError as err:
        err.read()
        return err.code, {k.lower(): v for k, v in err.headers.items()}


def _dict(message: Any) -> dict[str, Any]:
    # a JSON round trip turns the OrderedDicts of Any fields into plain dicts for yaml.safe_dump
    return json.loads(json.dumps(MessageToDict(message, preserving_proto_field_name=True)))
