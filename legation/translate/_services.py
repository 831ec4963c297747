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
is a class here (``AuthzSide``, ``ExtProcSide``, ``RateLimitSide``) that its table entry names.
Each side *decides* first (``decide(mesh, route) -> Hop``: whether the route calls the service,
over which protocol, through which filter and cluster, and why) and then writes that decision
into the route; :func:`route_hops` is the same decisions for ``legation explain``, so what it
prints is what the translation did.

ext_authz over HTTP (``extauthz.protocol: http``): the connection managers get a second ext_authz
filter, :data:`EXTAUTHZ_HTTP_FILTER`, in Envoy's HTTP mode after the gRPC one, calling the
call-out server (:mod:`legation.fastpath`) on cluster ``legation|extauthz-http`` (HTTP/1.1,
``host:http_port``); every route disables one of the two. The rule, here and only here
(:func:`authz_call`), for a route with an ``authz`` policy:

1. ``extauthz.protocol`` is ``grpc`` (the default): gRPC, and the config is today's, unchanged;
2. the route sets ``authz_protocol: grpc``: gRPC (the way to keep a route whose policy mutates
   query parameters, reads peer/TLS attributes or headers outside ``http_headers.request``,
   none of which the translation can see);
3. a ``rate_limits`` descriptor reads a ``jwt_claim``: gRPC (the claim travels in ext_authz's
   structured dynamic metadata, which HTTP mode does not carry);
4. otherwise HTTP: one HTTP/1.1 call instead of a gRPC one.

A decision the HTTP call-out cannot carry (e.g. a query-parameter mutation) is denied with the
service's ``error_status`` (fail closed), never half-applied.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)

from legation.certs.issuer import service_identity
from legation.config.extensions import ExtAuthzService, HttpCalloutHeaders, RateLimitAction
from legation.config.model import Mesh
from legation.config.routes import Route
from legation.errors import ConfigError
from legation.extauthz import envoy_filter as authz_filter
from legation.extauthz.envoy_filter import FILTER_NAME as EXT_AUTHZ_FILTER_NAME
from legation.extauthz.jwt import METADATA_KEY as JWT_METADATA_KEY
from legation.extproc import envoy_filter as proc_filter
from legation.extproc.config import Chains
from legation.fastpath import envoy_filter as fast_filter
from legation.ratelimit import envoy_filter as rl_filter
from legation.services import kinds
from legation.services.kinds import ServiceKind
from legation.translate._mtls import upstream_tls

EXTAUTHZ_FILTER = authz_filter.FILTER_NAME
EXTAUTHZ_HTTP_FILTER = "legation.ext_authz.http"
"""The ext_authz filter in HTTP mode: its own name, so routes can disable one or the other (the
gRPC one keeps Envoy's name, the namespace of its dynamic metadata)."""
EXTAUTHZ_HTTP_CLUSTER = "legation|extauthz-http"
EXTPROC_FILTER = proc_filter.FILTER_NAME
RATELIMIT_FILTER = rl_filter.RATE_LIMIT_FILTER

Protocol = Literal["grpc", "http"]


def cluster_name(kind: ServiceKind) -> str:
    """The static cluster Envoy calls the service on: ``legation|<kind>``."""
    return f"legation|{kind.name}"


@dataclass(frozen=True, kw_only=True)
class Hop:
    """What one service does for one route, and why: ``calls`` (a call-out per request),
    over ``protocol`` through ``filter`` to ``cluster`` (all None when it makes no call)."""

    kind: str
    calls: bool
    reason: str
    protocol: Protocol | None = None
    filter: str | None = None
    cluster: str | None = None


def _no_call(kind: str, reason: str) -> Hop:
    return Hop(kind=kind, calls=False, reason=reason)


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def authz_callout(block: ExtAuthzService) -> fast_filter.Callout:
    """The HTTP call-out both sides are built from: the filter and per-route overrides here, the
    server's forwarded headers in :mod:`legation.services.extauthz`."""
    headers = block.http_headers or HttpCalloutHeaders()
    return fast_filter.Callout(
        cluster=EXTAUTHZ_HTTP_CLUSTER,
        timeout_ms=_ms(block.timeout.total_seconds()),
        failure_mode_allow=block.fail_open,
        allowed_headers=tuple(headers.request),
        upstream_headers=tuple(headers.upstream),
        client_headers=tuple(headers.client),
    )


def authz_call(mesh: Mesh, spec: Route | None) -> Hop:
    """ext_authz for one route: no call, gRPC or HTTP (the rule in the module docstring)."""
    kind = "extauthz"
    block = mesh.extauthz
    if block is None:
        return _no_call(kind, "the mesh declares no extauthz")
    if spec is None:
        return _no_call(kind, "a service's default route asks for nothing")
    if spec.authz is None:
        return _no_call(kind, "the route has no authz")
    if spec.authz == "disabled":
        return _no_call(kind, "authz: disabled")

    def grpc(why: str) -> Hop:
        return Hop(
            kind=kind,
            calls=True,
            protocol="grpc",
            filter=EXTAUTHZ_FILTER,
            cluster=cluster_name(kinds.get(kind)),
            reason=f"policy {spec.authz}; {why}",
        )

    if not block.http:
        return grpc("extauthz.protocol is grpc")
    if spec.authz_protocol == "grpc":
        return grpc("the route sets authz_protocol: grpc")
    claims = sorted(
        {a.jwt_claim.claim for d in spec.rate_limits for a in d.actions if a.jwt_claim is not None}
    )
    if claims:
        return grpc(
            f"rate_limits read jwt_claim {', '.join(claims)} from ext_authz's "
            "structured dynamic metadata, which HTTP mode does not carry"
        )
    return Hop(
        kind=kind,
        calls=True,
        protocol="http",
        filter=EXTAUTHZ_HTTP_FILTER,
        cluster=EXTAUTHZ_HTTP_CLUSTER,
        reason=f"policy {spec.authz}; extauthz.protocol is http and the route needs "
        "nothing HTTP mode lacks",
    )


class AuthzSide:
    """ext_authz in Envoy: the filter(s), cluster(s), each route's policy or ``disabled``."""

    @staticmethod
    def decide(mesh: Mesh, spec: Route | None) -> Hop:
        return authz_call(mesh, spec)

    @staticmethod
    def http_filters(block: Any, cluster: str) -> list[hcm_pb2.HttpFilter]:
        out = [
            authz_filter.http_filter(
                cluster,
                timeout_ms=_ms(block.timeout.total_seconds()),
                failure_mode_allow=block.fail_open,
            )
        ]
        if block.http:
            http = fast_filter.http_filter(authz_callout(block))
            http.name = EXTAUTHZ_HTTP_FILTER
            out.append(http)
        return out

    @staticmethod
    def clusters(block: Any, cluster: str) -> list[cluster_pb2.Cluster]:
        out = [authz_filter.grpc_cluster(cluster, [(block.host, block.port)])]
        if block.http:
            out.append(
                fast_filter.http_cluster(EXTAUTHZ_HTTP_CLUSTER, [(block.host, block.http_port)])
            )
        return out

    @staticmethod
    def per_route(
        out: rc.Route, hop: Hop, block: Any, spec: Route | None, chains: Chains, index: int
    ) -> None:
        assert spec is not None or not hop.calls
        grpc = hop.calls and hop.protocol == "grpc"
        out.typed_per_filter_config[EXTAUTHZ_FILTER].Pack(
            authz_filter.per_route(policy=spec.authz)
            if grpc and spec is not None
            else authz_filter.per_route(disabled=True)
        )
        if block.http:
            out.typed_per_filter_config[EXTAUTHZ_HTTP_FILTER].Pack(
                fast_filter.per_route(authz_callout(block), policy=spec.authz)
                if hop.calls and not grpc and spec is not None
                else fast_filter.per_route(disabled=True)
            )


class ExtProcSide:
    """ext_proc in Envoy: the filter, its cluster, each route's chain or ``disabled``."""

    @staticmethod
    def decide(mesh: Mesh, spec: Route | None) -> Hop:
        kind = "extproc"
        if mesh.extproc is None:
            return _no_call(kind, "the mesh declares no extproc")
        if spec is None or not spec.filters:
            return _no_call(kind, "the route has no filters")
        names = ", ".join(f.name for f in spec.filters)
        return Hop(
            kind=kind,
            calls=True,
            protocol="grpc",
            filter=EXTPROC_FILTER,
            cluster=cluster_name(kinds.get(kind)),
            reason=f"filters {names} (ext_proc is a gRPC stream)",
        )

    @staticmethod
    def http_filters(block: Any, cluster: str) -> list[hcm_pb2.HttpFilter]:
        return [
            proc_filter.http_filter(
                cluster,
                message_timeout=block.timeout.total_seconds(),
                failure_mode_allow=block.fail_open,
            )
        ]

    @staticmethod
    def clusters(block: Any, cluster: str) -> list[cluster_pb2.Cluster]:
        return [proc_filter.grpc_cluster(cluster, block.host, block.port)]

    @staticmethod
    def per_route(
        out: rc.Route, hop: Hop, block: Any, spec: Route | None, chains: Chains, index: int
    ) -> None:
        chain = chains.get(spec.name) if spec is not None and hop.calls else None
        out.typed_per_filter_config[EXTPROC_FILTER].Pack(proc_filter.per_route(chain))


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
        return Hop(
            kind=kind,
            calls=True,
            protocol="grpc",
            filter=RATELIMIT_FILTER,
            cluster=cluster_name(kinds.get(kind)),
            reason=f"{len(spec.rate_limits)} rate_limits descriptor(s) (the "
            "RateLimitService is gRPC)",
        )

    @staticmethod
    def http_filters(block: Any, cluster: str) -> list[hcm_pb2.HttpFilter]:
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
        return [rl_filter.rate_limit_cluster(cluster, block.host, block.port)]

    @staticmethod
    def per_route(
        out: rc.Route, hop: Hop, block: Any, spec: Route | None, chains: Chains, index: int
    ) -> None:
        if spec is None or not hop.calls:
            return
        if not out.HasField("route"):
            raise ConfigError(
                f"routes[{index}].rate_limits: only applies to routes with 'to' or 'split'",
                code="invalid_config",
            )
        out.route.rate_limits.extend(
            rl_filter.route_rate_limits(*([_spec(a) for a in d.actions] for d in spec.rate_limits))
        )


def service_filters(mesh: Mesh) -> list[hcm_pb2.HttpFilter]:
    """The declared services' HTTP filters, in chain order (before the router)."""
    return [
        f
        for kind, block in kinds.blocks(mesh)
        for f in kind.envoy_side().http_filters(block, cluster_name(kind))
    ]


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
                alpn = ("http/1.1",) if cluster.name == EXTAUTHZ_HTTP_CLUSTER else ("h2",)
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
