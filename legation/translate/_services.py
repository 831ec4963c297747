"""The request-path services in a proxy's config: HTTP filters, gRPC clusters, per-route settings.

When the mesh declares ``extauthz``, ``extproc`` or ``ratelimit``, the connection managers that
carry mesh routes (the gateway, and sidecars' ``outbound`` listeners) get the service's filter,
after Envoy's native fault and local_ratelimit filters and before the router, in this order:

1. ``ext_authz``: deny first, before any other call-out is spent on the request;
2. ``ext_proc``: the route's filter chain (it may set headers, e.g. a cohort, that re-match the
   route and that rate-limit descriptors read);
3. ``ratelimit``: count only requests that were allowed and are about to be forwarded.

Sidecar ``inbound`` listeners get none of them: the caller's side (gateway or outbound sidecar)
already applied the route's settings, as it does for timeouts and retries.

Every route in those route configurations says what each filter does there, so a request makes
no call-out that its route does not ask for: ext_authz is ``disabled`` unless the route has an
``authz`` policy (which travels in ``context_extensions["policy"]``); ext_proc is ``disabled``
unless the route has ``filters`` (its chain, named after the route, travels in the stream's
``x-legation-chain`` metadata with the processing mode its filters need); a route's
``rate_limits`` become its route action's descriptor actions. Envoy fails closed or open as each
block's ``failure_mode`` says.

A service whose block uses mesh TLS (``tls: mesh``, the default when the mesh's mTLS is on) is
called over mutual TLS: its cluster presents the proxy's workload certificate (SDS
``legation-workload-cert``), verifies the server against the trust bundle (SDS
``legation-trust-bundle``) and accepts only the URI SAN
``spiffe://<trust_domain>/ns/<namespace>/sa/legation-<kind>``, offering ALPN ``h2`` (gRPC;
``http/1.1`` to the ext_authz HTTP call-out, which serves the same certificate).

The kinds and their order come from :data:`legation.services.kinds.KINDS`; each kind's Envoy side
is a class (``AuthzSide`` in ``_authz``, ``ExtProcSide`` in ``_extproc``, ``RateLimitSide`` here)
that its table entry names.
Each side *decides* first (``decide(mesh, route) -> Hop``: whether the route calls the service,
over which protocol, through which filter and cluster, and why) and then writes that decision
into the route; :func:`route_hops` is the same decisions for ``legation explain``, so what it
prints is what the translation did.

ext_authz over HTTP (``extauthz.protocol: http``) and the rule that picks HTTP or gRPC per route:
:mod:`legation.translate._authz`; ext_proc over Envoy's HTTP transport: :mod:`._extproc`.
"""

from __future__ import annotations

from typing import Any

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)

from legation import envoy_grpc
from legation.certs.issuer import service_identity
from legation.config.attachments import RateLimitAction
from legation.config.model import Mesh
from legation.config.routes import Route
from legation.errors import ConfigError
from legation.extauthz.envoy_filter import FILTER_NAME as EXT_AUTHZ_FILTER_NAME
from legation.extauthz.jwt import METADATA_KEY as JWT_METADATA_KEY
from legation.extproc.config import Chains
from legation.ratelimit import envoy_filter as rl_filter
from legation.services import kinds
from legation.translate._authz import (
    EXTAUTHZ_HTTP_CLUSTER,
    fused_filters,
    fused_hop,
    fused_per_route,
)
from legation.translate._extproc import EXTPROC_HTTP_CLUSTER
from legation.translate._hops import Hop, _ms, _no_call, cluster_name, worker_endpoints
from legation.translate._mtls import upstream_tls

RATELIMIT_FILTER = rl_filter.RATE_LIMIT_FILTER
HTTP_CLUSTERS = frozenset({EXTAUTHZ_HTTP_CLUSTER, EXTPROC_HTTP_CLUSTER})
"""The HTTP/1.1 call-outs' clusters (ALPN http/1.1 under mTLS; the gRPC services want h2)."""


def fused_or_grpc(
    mesh: Mesh, spec: Route, kind: str, what: str, filter_name: str, why_grpc: str
) -> Hop:
    """``kind``'s hop for ``what`` on ``spec``: in the fused HTTP call-out when the route is
    fused, else its own gRPC call (the reason says why it was not fused, if there is one)."""
    fused = fused_hop(mesh, spec, kind, what)
    if isinstance(fused, Hop):
        return fused
    return Hop(
        kind=kind,
        calls=True,
        protocol="grpc",
        filter=filter_name,
        cluster=cluster_name(kinds.get(kind)),
        reason=f"{what} ({why_grpc})" + (f"; not fused: {fused}" if fused else ""),
    )


class RateLimitSide:
    """Rate limiting in Envoy: the filter (the mesh's domain), its cluster, each route's
    descriptors on its route action."""

    @staticmethod
    def decide(mesh: Mesh, spec: Route | None) -> Hop:
        kind = "ratelimit"
        if mesh.ratelimit is None:
            return _no_call(kind, "the mesh declares no ratelimit")
        if spec is None or not spec.rate_limits:
            return _no_call(kind, "the route has no rate_limits")
        what = f"{len(spec.rate_limits)} rate_limits descriptor(s)"
        return fused_or_grpc(
            mesh, spec, kind, what, RATELIMIT_FILTER, "the RateLimitService is gRPC"
        )

    @staticmethod
    def http_filters(
        block: Any, cluster: str, mesh: Mesh | None = None
    ) -> list[hcm_pb2.HttpFilter]:
        return [
            rl_filter.rate_limit_filter(
                domain=block.domain,
                cluster=cluster,
                failure_mode="allow" if block.fail_open else "deny",
                timeout_ms=_ms(block.timeout.total_seconds()),
            )
        ]

    @staticmethod
    def clusters(block: Any, cluster: str) -> list[cluster_pb2.Cluster]:
        return [envoy_grpc.grpc_cluster(cluster, worker_endpoints(block, block.port))]

    @staticmethod
    def per_route(
        out: rc.Route, hop: Hop, block: Any, spec: Route | None, chains: Chains, index: int
    ) -> None:
        if spec is None or not hop.calls or hop.protocol != "grpc":
            return  # no call, or decided in the fused call-out
        if not out.HasField("route"):
            raise ConfigError(
                f"routes[{index}].rate_limits: only applies to routes with 'to' or 'split'",
                code="invalid_config",
            )
        out.route.rate_limits.extend(
            rl_filter.route_rate_limits(*([_spec(a) for a in d.actions] for d in spec.rate_limits))
        )


def service_filters(mesh: Mesh) -> list[hcm_pb2.HttpFilter]:
    """The declared services' HTTP filters, in chain order, then the fused filters (the other
    call-outs are off on a fused route), before the router."""
    return [
        f
        for kind, block in kinds.blocks(mesh)
        for f in kind.envoy_side().http_filters(block, cluster_name(kind), mesh)
    ] + fused_filters(mesh)


def service_clusters(mesh: Mesh) -> list[cluster_pb2.Cluster]:
    """A static cluster per declared service (its address needs no EDS; HTTP/2 for gRPC,
    HTTP/1.1 for the ext_authz HTTP call-out); mTLS when the service uses mesh TLS (the HTTP
    call-out too: same certificate, same SPIFFE id checked, ALPN http/1.1)."""
    out = []
    for kind, block in kinds.blocks(mesh):
        tls = block.mesh_tls(mtls_enabled=mesh.mtls.enabled)
        for cluster in kind.envoy_side().clusters(block, cluster_name(kind)):
            if tls:
                # the HTTP call-out speaks HTTP/1.1; the gRPC services want h2
                alpn = ("http/1.1",) if cluster.name in HTTP_CLUSTERS else ("h2",)
                cluster.transport_socket.CopyFrom(
                    upstream_tls(service_identity(mesh, kind.name), alpn=alpn)
                )
            out.append(cluster)
    return out


def route_hops(mesh: Mesh, spec: Route | None) -> list[Hop]:
    """What each declared service does for mesh route ``spec`` (None: a default route), in
    filter order: the decisions :func:`apply_services` writes into the route."""
    return [kind.envoy_side().decide(mesh, spec) for kind, _ in kinds.blocks(mesh)]


def apply_services(
    mesh: Mesh, out: rc.Route, spec: Route | None, chains: Chains, *, index: int = -1
) -> None:
    """Set on ``out`` what each declared service does for mesh route ``spec`` (None: a default
    route, which asks for nothing). ``index`` is the route's position, for error messages."""
    for (kind, block), hop in zip(kinds.blocks(mesh), route_hops(mesh, spec), strict=True):
        kind.envoy_side().per_route(out, hop, block, spec, chains, index)
    fused_per_route(mesh, out, spec)


def _spec(action: RateLimitAction) -> rl_filter.DescriptorSpec:
    if action.generic_key is not None:
        return rl_filter.GenericKey(action.generic_key.value, action.generic_key.key)
    if action.request_headers is not None:
        h = action.request_headers
        return rl_filter.RequestHeader(h.header, h.key, h.skip_if_absent)
    if action.jwt_claim is not None:
        # the ext_authz jwt check puts claims_to_metadata in the filter's dynamic metadata
        c = action.jwt_claim
        return rl_filter.Metadata(
            c.key or c.claim,
            EXT_AUTHZ_FILTER_NAME,
            (JWT_METADATA_KEY, c.claim),
            skip_if_absent=True,
        )
    return rl_filter.RemoteAddress()
