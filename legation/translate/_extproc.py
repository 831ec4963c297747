"""ext_proc's Envoy side: the gRPC filter and, with ``extproc.protocol: http``, a filter per chain
served over Envoy's ext_proc HTTP transport, and per route which one runs, and why.

The rule, here and only here (:meth:`ExtProcSide.decide`), for a route with ``filters``:

1. the route is fused into the ext_authz HTTP call-out (:mod:`._fused`): it stays fused (one call
   decides its authz, routing and rate limits);
2. ``extproc.protocol`` is ``http`` and the route's chain needs headers only, its response
   hooks (if any) ``stateless`` (:func:`legation.extproc.http_server.fits_http`): Envoy's HTTP
   transport, one POST per message, through the chain's own filter
   ``legation.ext_proc.http.<route>`` (the filter's ``http_service`` names the chain in its
   path, and Envoy's per-route overrides cannot change it, so each such chain gets a filter,
   disabled unless its route enables it);
3. otherwise the gRPC stream (a body, trailers, or a response hook that may read the request's
   state need the stream to carry it from one message to the next).

Envoy marks ``http_service`` work-in-progress (not covered by its threat model), which is why
``protocol: http`` is an opt-in of the mesh and nothing picks it by default. The HTTP filters sit
right after the gRPC one, before rate limiting (whose descriptors read the headers a chain sets);
their cluster ``legation|extproc-http`` lists one HTTP/1.1 endpoint per worker
(``http_port + 100 i``), over mTLS as the other services when the block uses mesh TLS.
"""

from __future__ import annotations

from typing import Any

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)

from legation import envoy_grpc
from legation.config.model import Mesh
from legation.config.routes import Route
from legation.extproc import envoy_filter as proc_filter
from legation.extproc.config import Chains
from legation.extproc.http_server import fits_http
from legation.fastpath import envoy_filter as fast_filter
from legation.services import kinds
from legation.translate._authz import fused_hop
from legation.translate._hops import Hop, _no_call, cluster_name, worker_endpoints

__all__ = ["EXTPROC_FILTER", "EXTPROC_HTTP_CLUSTER", "HTTP_FILTER_PREFIX", "ExtProcSide"]

EXTPROC_FILTER = proc_filter.FILTER_NAME
EXTPROC_HTTP_CLUSTER = "legation|extproc-http"
HTTP_FILTER_PREFIX = "legation.ext_proc.http."


def _chains(mesh: Mesh) -> Chains:
    from legation.services import route_chains  # plugin instances: only their phases are read

    return route_chains(mesh)


class ExtProcSide:
    """ext_proc in Envoy: the filters, the clusters, each route's chain or ``disabled``."""

    @staticmethod
    def decide(mesh: Mesh, spec: Route | None) -> Hop:
        kind = "extproc"
        block = mesh.extproc
        if block is None:
            return _no_call(kind, "the mesh declares no extproc")
        if spec is None or not spec.filters:
            return _no_call(kind, "the route has no filters")
        what = f"filters {', '.join(f.name for f in spec.filters)}"
        fused = fused_hop(mesh, spec, kind, what)
        if isinstance(fused, Hop):
            return fused
        not_fused = f"; not fused: {fused}" if fused else ""
        why_grpc = "ext_proc is a gRPC stream"
        if block.http:
            chain = _chains(mesh).get(spec.name)
            misfit = fits_http(chain) if chain is not None else "the route has no chain"
            if misfit is None:
                return Hop(
                    kind=kind,
                    calls=True,
                    protocol="http",
                    filter=HTTP_FILTER_PREFIX + spec.name,
                    cluster=EXTPROC_HTTP_CLUSTER,
                    reason=f"{what} over ext_proc's HTTP transport (extproc.protocol: http and "
                    "the chain needs headers only, no state across phases; Envoy's "
                    f"http_service is work-in-progress){not_fused}",
                )
            why_grpc = f"not over HTTP: {misfit}"
        return Hop(
            kind=kind,
            calls=True,
            protocol="grpc",
            filter=EXTPROC_FILTER,
            cluster=cluster_name(kinds.get(kind)),
            reason=f"{what} ({why_grpc}){not_fused}",
        )

    @staticmethod
    def http_filters(
        block: Any, cluster: str, mesh: Mesh | None = None
    ) -> list[hcm_pb2.HttpFilter]:
        out = [
            proc_filter.http_filter(
                cluster,
                message_timeout=block.timeout.total_seconds(),
                failure_mode_allow=block.fail_open,
            )
        ]
        if mesh is None or not block.http:
            return out
        chains = _chains(mesh)
        for route in mesh.routes:
            hop = ExtProcSide.decide(mesh, route)
            chain = chains.get(route.name)
            if hop.protocol == "http" and hop.filter != EXTPROC_FILTER and chain is not None:
                assert hop.filter is not None
                out.append(
                    proc_filter.http_transport_filter(
                        hop.filter,
                        EXTPROC_HTTP_CLUSTER,
                        chain,
                        message_timeout=block.timeout.total_seconds(),
                    )
                )
        return out

    @staticmethod
    def clusters(block: Any, cluster: str) -> list[cluster_pb2.Cluster]:
        out = [envoy_grpc.grpc_cluster(cluster, worker_endpoints(block, block.port))]
        if block.http:
            endpoints = worker_endpoints(block, block.http_port)
            out.append(fast_filter.http_cluster(EXTPROC_HTTP_CLUSTER, endpoints))
        return out

    @staticmethod
    def per_route(
        out: rc.Route, hop: Hop, block: Any, spec: Route | None, chains: Chains, index: int
    ) -> None:
        grpc = hop.calls and hop.protocol == "grpc"
        chain = chains.get(spec.name) if spec is not None and grpc else None
        out.typed_per_filter_config[EXTPROC_FILTER].Pack(proc_filter.per_route(chain))
        if hop.protocol == "http" and hop.filter is not None:
            if hop.filter.startswith(HTTP_FILTER_PREFIX):  # not the fused call-out's
                out.typed_per_filter_config[hop.filter].CopyFrom(proc_filter.enabled_here())
