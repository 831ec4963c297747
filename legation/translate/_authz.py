"""ext_authz's Envoy side: the gRPC filter and, with ``extauthz.protocol: http``, the HTTP-mode
filter and the call-out cluster, and per route which of the two is called, and why.

ext_authz over HTTP (``extauthz.protocol: http``): the connection managers get a second ext_authz
filter, :data:`EXTAUTHZ_HTTP_FILTER`, in Envoy's HTTP mode after the gRPC one, calling the
call-out server (:mod:`legation.fastpath`) on cluster ``legation|extauthz-http`` (HTTP/1.1,
``host:http_port``, or the Unix socket ``http_socket``); every route disables one of the two.
A route's policy (and a fused route's name) travels in its metadata, which the filter's one
``http_service`` sends (:func:`legation.fastpath.envoy_filter.configure_route`). The rule,
here and only here (:func:`authz_call`), for a route with an ``authz`` policy:

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

from dataclasses import replace
from typing import Any

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)

from legation.config.extensions import ExtAuthzService, HttpCalloutHeaders
from legation.config.model import Mesh
from legation.config.routes import Route
from legation.extauthz import envoy_filter as authz_filter
from legation.extproc.config import Chains
from legation.fastpath import envoy_filter as fast_filter
from legation.services import kinds
from legation.translate._fused import (
    FusedRoute,
    client_headers,
    fused,
    fused_routes,
    request_headers,
    upstream_headers,
)
from legation.translate._hops import Hop, _ms, _no_call, cluster_name, worker_endpoints

EXTAUTHZ_FILTER = authz_filter.FILTER_NAME
EXTAUTHZ_HTTP_FILTER = "legation.ext_authz.http"
"""The ext_authz filter in HTTP mode: its own name, so routes can disable one or the other (the
gRPC one keeps Envoy's name, the namespace of its dynamic metadata)."""
EXTAUTHZ_HTTP_CLUSTER = "legation|extauthz-http"
FUSED_FILTERS = {False: "legation.fused", True: "legation.fused.open"}
"""The fused filters (ext_authz in HTTP mode calling the same server, re-picking the route), by
whether they fail open: one per failure mode the fused routes need (:mod:`._fused`)."""


def authz_callout(block: ExtAuthzService, mesh: Mesh | None = None) -> fast_filter.Callout:
    """The HTTP call-out both sides are built from: the filter and route settings here, the
    server's forwarded headers in :mod:`legation.services.extauthz`. With ``mesh``: the fused
    filters' (the headers the fused routes read and answer with added; the server takes these)."""
    headers = block.http_headers or HttpCalloutHeaders()
    request, upstream, client = list(headers.request), list(headers.upstream), list(headers.client)
    if mesh is not None:
        routes = fused(mesh)
        request += [h for h in request_headers(routes) if h not in request]
        upstream += [h for h in upstream_headers(routes) if h not in upstream]
        client += [h for h in client_headers(mesh, routes) if h not in client]
    return fast_filter.Callout(
        name=EXTAUTHZ_HTTP_FILTER,
        cluster=EXTAUTHZ_HTTP_CLUSTER,
        timeout_ms=_ms(block.timeout.total_seconds()),
        failure_mode_allow=block.fail_open,
        allowed_headers=tuple(request),
        upstream_headers=tuple(upstream),
        client_headers=tuple(client),
    )


def fused_callout(mesh: Mesh, *, fail_open: bool) -> fast_filter.Callout:
    """A fused filter's call-out: the server's headers, re-picking the route, failing as its
    routes' services do (:attr:`FusedRoute.fail_open`), with the client's address when one of
    them reads it."""
    assert mesh.extauthz is not None
    base = authz_callout(mesh.extauthz, mesh)
    routes = [r for r in fused(mesh) if r.fail_open == fail_open]
    return replace(
        base,
        name=FUSED_FILTERS[fail_open],
        failure_mode_allow=fail_open,
        clear_route_cache=True,
        remote_address=any(r.reads_remote_address for r in routes),
    )


def fused_filters(mesh: Mesh) -> list[hcm_pb2.HttpFilter]:
    """The fused filters the mesh's fused routes use (closed, open), last before the router."""
    return [
        fast_filter.http_filter(fused_callout(mesh, fail_open=fail_open))
        for fail_open in sorted({r.fail_open for r in fused(mesh)})
    ]


def fused_per_route(mesh: Mesh, out: rc.Route, spec: Route | None) -> None:
    """Each fused filter's setting on ``out``: the route's fused call, or ``disabled``."""
    present = {r.fail_open for r in fused(mesh)}
    found = fused_routes(mesh).get(spec.name) if spec is not None else None
    for fail_open in present:
        name = FUSED_FILTERS[fail_open]  # fused_callout's
        if isinstance(found, FusedRoute) and found.fail_open == fail_open:
            fast_filter.configure_route(out, name, policy=found.authz, route=found.name)
        else:
            fast_filter.configure_route(out, name, disabled=True)


def fused_hop(mesh: Mesh, spec: Route | None, kind: str, what: str) -> Hop | str | None:
    """``kind``'s hop on a fused route (``what`` says what is fused), or why the route is not
    fused (None: the mesh has no HTTP call-out, nothing to say)."""
    if spec is None or mesh.extauthz is None or not mesh.extauthz.http:
        return None
    found = fused_routes(mesh).get(spec.name)
    if not isinstance(found, FusedRoute):
        return found
    return Hop(
        kind=kind,
        calls=True,
        protocol="http",
        filter=FUSED_FILTERS[found.fail_open],
        cluster=EXTAUTHZ_HTTP_CLUSTER,
        reason=f"{what}, fused into the one HTTP call-out",
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
    hop = fused_hop(mesh, spec, kind, f"policy {spec.authz}")
    if isinstance(hop, Hop):
        return hop
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
        "nothing HTTP mode lacks"
        + (f"; not fused: {hop}" if hop and (spec.rate_limits or spec.filters) else ""),
    )


class AuthzSide:
    """ext_authz in Envoy: the filter(s), cluster(s), each route's policy or ``disabled``."""

    @staticmethod
    def decide(mesh: Mesh, spec: Route | None) -> Hop:
        return authz_call(mesh, spec)

    @staticmethod
    def http_filters(
        block: Any, cluster: str, mesh: Mesh | None = None
    ) -> list[hcm_pb2.HttpFilter]:
        out = [
            authz_filter.http_filter(
                cluster,
                timeout_ms=_ms(block.timeout.total_seconds()),
                failure_mode_allow=block.fail_open,
            )
        ]
        if block.http:
            out.append(fast_filter.http_filter(authz_callout(block)))
        return out

    @staticmethod
    def clusters(block: Any, cluster: str) -> list[cluster_pb2.Cluster]:
        out = [authz_filter.grpc_cluster(cluster, worker_endpoints(block, block.port))]
        if block.http:
            endpoints = (
                block.worker_sockets()
                if block.http_socket is not None
                else worker_endpoints(block, block.http_port)
            )
            out.append(fast_filter.http_cluster(EXTAUTHZ_HTTP_CLUSTER, endpoints))
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
            if hop.filter == EXTAUTHZ_HTTP_FILTER and spec is not None:
                fast_filter.configure_route(out, EXTAUTHZ_HTTP_FILTER, policy=spec.authz)
            else:
                fast_filter.configure_route(out, EXTAUTHZ_HTTP_FILTER, disabled=True)
