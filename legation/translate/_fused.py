"""Fused decisions: which routes have their rate limits and header routing decided in the HTTP
call-out, in the same call as their authz, and why the others do not.

With ``extauthz.protocol: http`` a route's whole request-path work can be one HTTP call to the
ext_authz service's call-out server (:mod:`legation.fastpath.fused`): authz, then the route's
``header_route`` filters (the routing header set or removed, Envoy re-picks the route:
``clear_route_cache``), then its ``rate_limits`` descriptors counted by Legation's limiter (429
with the ``x-ratelimit-*`` headers). A route is *fused* when all of it fits (:func:`fused_routes`
gives the first reason it does not):

1. ``extauthz`` is embedded with ``protocol: http`` and the route does not set
   ``authz_protocol: grpc``;
2. every filter is ``header_route`` (other filters need ext_proc's stream), reading no
   ``x-legation-*`` header (HTTP mode never passes a client's) and clearing the route cache;
3. every descriptor entry is a ``generic_key``, a ``request_headers`` (not an ``x-legation-*``
   header, unless the route's own routing sets it) or ``remote_address`` (Envoy passes the
   address it trusts in :data:`~legation.fastpath.contract.REMOTE_ADDRESS_HEADER`); a
   ``jwt_claim`` needs ext_authz's structured metadata (gRPC only). Rate limits need an
   embedded ``ratelimit`` block (its limits file) without ``response_dynamic_metadata`` and a
   route action (``to``/``split``);
4. Envoy evaluates ``rate_limits`` on the route a request *ends* on, after header routing
   re-picked it, while the fused call counts the first route's: so every route header routing can
   move a request between (a *routing group*) must carry the same ``rate_limits``, and the group
   is fused or not as a whole (:mod:`._routing_groups`). The group must share one ``authz``
   too: Envoy never runs the authz of a route it re-picked (the chain has the same gap,
   through ext_proc's ``clear_route_cache``; a fused route never has it);
5. with the ``memory`` backend the counters live in one process: rate limits are fused only if
   every rate-limited route is and the ext_authz service runs one worker, so neither the gRPC
   rate-limit service and the call-out nor two call-out workers count the same domain side by
   side (with ``redis`` all share the store and any mix is consistent).

Routes that do not fit keep the call-outs they have without fusing (their authz may still be the
HTTP call-out). ``legation explain`` prints these decisions.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from legation.config.attachments import RateLimitAction
from legation.config.extensions import GrpcService
from legation.config.model import Mesh
from legation.config.routes import Route
from legation.extauthz._headers import bad_header_value
from legation.fastpath.contract import HEADER_PREFIX, RATELIMIT_HEADERS
from legation.fastpath.descriptors import Entry, GenericEntry, HeaderEntry, RemoteEntry
from legation.translate._routing_groups import ROUTING_FILTER, routing_groups, routing_headers

__all__ = ["FusedRoute", "client_headers", "fused_routes", "request_headers", "upstream_headers"]


@dataclass(frozen=True, kw_only=True)
class FusedRoute:
    """What the call-out decides for one fused route."""

    name: str
    authz: str | None
    """The route's policy, or None: no authz (the call decides rate limits and routing only)."""
    descriptors: tuple[tuple[Entry, ...], ...]
    routing: tuple[object, ...]
    """The route's ``header_route`` configs (:class:`HeaderRouteOptions`), in order."""
    fail_open: bool
    """Envoy lets the request through when the call fails: only if every service it stands for
    fails open (a route's ext_authz or ext_proc closed keeps it closed)."""

    @property
    def rate_limited(self) -> bool:
        return bool(self.descriptors)

    @property
    def reads_remote_address(self) -> bool:
        """Whether a descriptor needs the client address (Envoy then passes it)."""
        return any(isinstance(e, RemoteEntry) for d in self.descriptors for e in d)


def _entry(action: RateLimitAction) -> Entry | str:
    if action.generic_key is not None:
        return GenericEntry(action.generic_key.key, action.generic_key.value)
    if action.request_headers is not None:
        h = action.request_headers
        header = h.header.lower()
        return HeaderEntry(":authority" if header == "host" else header, h.key, h.skip_if_absent)
    if action.remote_address is not None:
        return RemoteEntry()
    assert action.jwt_claim is not None
    return (
        f"rate_limits read jwt_claim {action.jwt_claim.claim} from ext_authz's structured "
        "dynamic metadata, which HTTP mode does not carry"
    )


def _misfit(mesh: Mesh, spec: Route) -> str | None:
    """Why ``spec`` alone cannot be fused (None: it can)."""
    if spec.authz_protocol == "grpc":
        return "the route sets authz_protocol: grpc"
    sets = routing_headers(spec)
    for f in spec.filters:
        if f.name != ROUTING_FILTER:
            return f"filter {f.name} needs ext_proc's stream (only header_route is fused)"
        if not f.config.clear_route_cache:
            return "header_route sets clear_route_cache: false (the call-out always re-picks)"
        values = [r.value for r in f.config.rules] + [f.config.default or ""]
        if any(bad_header_value(v) for v in values):
            return "a header_route value holds a control character (never sent as a header)"
        for rule in f.config.rules:
            read = rule.header or (rule.jwt_header if rule.jwt_claim else None)
            if read and read.lower().startswith(HEADER_PREFIX):
                return f"header_route reads {read}, which HTTP mode never passes from a client"
    if spec.filters and mesh.extproc is None:
        return "the mesh declares no extproc"
    if not spec.rate_limits:
        return None
    if mesh.ratelimit is None or not mesh.ratelimit.embedded:
        return "ratelimit is not embedded (the call-out has no limits file to count with)"
    if mesh.ratelimit.response_dynamic_metadata:
        return "ratelimit.response_dynamic_metadata is structured metadata (gRPC only)"
    if spec.to is None and spec.split is None:
        return "rate_limits need a route with 'to' or 'split'"
    for d in spec.rate_limits:
        for a in d.actions:
            entry = _entry(a)
            if isinstance(entry, str):
                return entry
            if (
                isinstance(entry, HeaderEntry)
                and entry.header.startswith(HEADER_PREFIX)
                and entry.header not in sets
            ):
                return (
                    f"rate_limits read {entry.header}, which HTTP mode never passes from a client"
                )
    return None


def _plan(mesh: Mesh) -> dict[str, FusedRoute | str]:
    block = mesh.extauthz
    out: dict[str, FusedRoute | str] = {}
    if block is None or not block.http:
        return {r.name: "extauthz.protocol is not http" for r in mesh.routes}
    if not block.embedded:
        why_not = "extauthz is not embedded (its call-out runs elsewhere)"
        return {r.name: why_not for r in mesh.routes}
    routes = mesh.routes
    why: dict[int, str] = {}
    # one fail mode per routing group: a request re-routed within a group must find its route
    # on the same fused filter, or the next filter (the other fail mode's) would count it again
    group_open: dict[int, bool] = {}
    for group in routing_groups(routes):
        opened = all(_fail_open(mesh, routes[i]) for i in group)
        group_open.update((i, opened) for i in group)
        limits = {repr([d.model_dump() for d in routes[i].rate_limits]) for i in group}
        policies = {routes[i].authz for i in group}
        misfits = {i: _misfit(mesh, routes[i]) for i in group}
        first_misfit = next(((i, m) for i, m in sorted(misfits.items()) if m), None)
        for i in group:
            if misfits[i]:
                why[i] = misfits[i]  # type: ignore[assignment]
            elif len(policies) > 1:
                why[i] = (
                    "header routing can move requests between this route and others with "
                    "another authz, which Envoy would not run after re-picking the route"
                )
            elif len(limits) > 1:
                why[i] = (
                    "header routing can move requests between this route and others with "
                    "other rate_limits (Envoy counts the route a request ends on)"
                )
            elif first_misfit is not None:
                other, reason = first_misfit
                why[i] = (
                    f"header routing can move requests to route {routes[other].name}, "
                    f"which is not fused ({reason})"
                )
    limited = [i for i, r in enumerate(routes) if r.rate_limits]
    memory = mesh.ratelimit is not None and mesh.ratelimit.backend == "memory"
    if memory and block.worker_count() > 1:
        for i in limited:
            why.setdefault(
                i,
                f"backend memory and extauthz runs {block.worker_count()} workers: one "
                "domain's counters must live in one process (workers: 1, or backend: redis)",
            )
    elif memory and any(i in why for i in limited):
        stays = routes[next(i for i in limited if i in why)].name
        for i in limited:
            why.setdefault(
                i,
                f"backend memory: route {stays}'s rate limits stay on the gRPC service, and "
                "one domain's counters must live in one process",
            )
    for i, r in enumerate(routes):
        if i in why:
            out[r.name] = why[i]
        elif not r.rate_limits and not r.filters:
            out[r.name] = "the route has no rate_limits or filters to fuse"
        else:
            out[r.name] = FusedRoute(
                name=r.name,
                authz=r.authz if r.authz not in (None, "disabled") else None,
                descriptors=tuple(
                    tuple(e for a in d.actions if not isinstance(e := _entry(a), str))
                    for d in r.rate_limits
                ),
                routing=tuple(f.config for f in r.filters),
                fail_open=group_open.get(i, _fail_open(mesh, r)),
            )
    return out


def _fail_open(mesh: Mesh, r: Route) -> bool:
    blocks: list[GrpcService | None] = []
    if r.authz not in (None, "disabled"):
        blocks.append(mesh.extauthz)
    if r.filters:
        blocks.append(mesh.extproc)
    if r.rate_limits:
        blocks.append(mesh.ratelimit)
    return all(b is not None and b.fail_open for b in blocks)


def fused_routes(mesh: Mesh) -> Mapping[str, FusedRoute | str]:
    """Every route's name -> its :class:`FusedRoute`, or why it is not fused (computed once per
    loaded mesh)."""
    cached: Mapping[str, FusedRoute | str] | None = mesh._fused
    if cached is None:
        cached = _plan(mesh)
        mesh._fused = cached
    return cached


def fused(mesh: Mesh) -> list[FusedRoute]:
    return [f for f in fused_routes(mesh).values() if isinstance(f, FusedRoute)]


def request_headers(routes: Iterable[FusedRoute]) -> list[str]:
    """The client headers the fused routes read (descriptors and routing rules' sources), which
    the fused filter's ``allowed_headers`` must send."""
    out: set[str] = set()
    for r in routes:
        for d in r.descriptors:
            out.update(
                e.header
                for e in d
                if isinstance(e, HeaderEntry)
                and not e.header.startswith((":", HEADER_PREFIX))
                and e.header != "host"
            )
        for options in r.routing:
            for rule in options.rules:  # type: ignore[attr-defined]
                if rule.header:
                    out.add(rule.header.lower())
                elif rule.cookie:
                    out.add("cookie")
                elif rule.jwt_claim and rule.jwt_header.lower() != "authorization":
                    out.add(rule.jwt_header.lower())
    return sorted(out)


def upstream_headers(routes: Iterable[FusedRoute]) -> list[str]:
    """Routing headers outside ``x-legation-*`` the fused answer sets upstream."""
    return sorted(
        {
            o.header.lower()  # type: ignore[attr-defined]
            for r in routes
            for o in r.routing
            if not o.header.lower().startswith(HEADER_PREFIX)  # type: ignore[attr-defined]
        }
    )


def client_headers(mesh: Mesh, routes: Iterable[FusedRoute]) -> list[str]:
    """The rate-limit headers a fused answer adds to the client's response when it allows."""
    if not any(r.rate_limited for r in routes) or mesh.ratelimit is None:
        return []
    out = list(RATELIMIT_HEADERS)
    if mesh.ratelimit.response_headers:
        names = mesh.ratelimit.response_header_names
        out += [names.limit.lower(), names.remaining.lower(), names.reset.lower()]
    return out
