"""The access-log service in a proxy's config: its cluster, and every connection manager's
access logs (``access_logs``).

When the mesh declares ``accesslog``, every HTTP connection manager (the gateway, the sidecars'
``inbound`` and ``outbound`` listeners) gets a gRPC access log to cluster ``legation|accesslog``
whose log name is the listener's name, so the aggregator knows which side of a proxy logged a
request (a sidecar's ``inbound`` entries count for the proxy only, see
:mod:`legation.observe.aggregator`), and the JSON access log the block gives that proxy (file or
stdout, see :mod:`legation.config.accesslog`; with ``service`` the access-log service writes the
lines, and the gRPC entries carry the ``traceparent`` header for them). The service is no HTTP
filter and makes no call per request: Envoy batches entries per worker and flushes them every
``flush_interval``.
"""

from __future__ import annotations

from typing import Any

from envoy.config.accesslog.v3 import accesslog_pb2
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)

from legation.config.model import Mesh
from legation.config.routes import Route
from legation.extproc.config import Chains
from legation.observe.envoy_config import access_log, als_cluster, json_log
from legation.observe.jsonlines import UPSTREAM_TIME
from legation.services import kinds
from legation.translate._hops import Hop, _no_call, cluster_name

KIND = "accesslog"


class AccessLogSide:
    """The access-log service in Envoy: its cluster; no filter, nothing per route."""

    @staticmethod
    def decide(mesh: Mesh, spec: Route | None) -> Hop:
        return _no_call(
            KIND, "entries are batched per Envoy worker and streamed, no call per request"
        )

    @staticmethod
    def http_filters(block: Any, cluster: str, mesh: Any = None) -> list[hcm_pb2.HttpFilter]:
        return []

    @staticmethod
    def clusters(block: Any, cluster: str) -> list[cluster_pb2.Cluster]:
        return [als_cluster(block.host, block.port, name=cluster)]

    @staticmethod
    def per_route(
        out: rc.Route, hop: Hop, block: Any, spec: Route | None, chains: Chains, index: int
    ) -> None:
        return None


def access_logs(mesh: Mesh, node_id: str, listener: str) -> list[accesslog_pb2.AccessLog]:
    """The access logs of ``node_id``'s connection manager ``listener`` (none without the
    ``accesslog`` block)."""
    block = mesh.accesslog
    if block is None:
        return []
    flush_ms = max(1, round(block.flush_interval.total_seconds() * 1000))
    json = block.log_of(node_id)
    # the service writes this proxy's lines: it needs the traceparent the request left with
    service = json.to == "service"
    out = [
        access_log(
            listener,
            cluster=cluster_name(kinds.get(KIND)),
            flush_interval_ms=flush_ms,
            request_headers=["traceparent"] if service else [],
            response_headers=[UPSTREAM_TIME] if service else [],
        )
    ]
    if json.to in ("file", "stdout"):
        out.append(json_log(node_id, listener, to=json.to, path=json.path_for(node_id)))
    return out
