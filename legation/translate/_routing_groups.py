"""Routing groups: the routes header routing can move a request between.

A route whose ``header_route`` filters set header H hands a request back to Envoy, which matches
the routes again (``clear_route_cache``): the request may end on any route whose path overlaps
and whose match reads H or, when the route itself matches on H, on any later one (the header
removed or changed, it may match no more). :func:`routing_groups` joins such routes;
:mod:`legation.translate._fused` fuses a group whole or not at all.
"""

from __future__ import annotations

from legation.config.routes import Route

__all__ = ["ROUTING_FILTER", "owned_headers", "read_headers", "routing_groups", "routing_headers"]

ROUTING_FILTER = "header_route"


def routing_headers(spec: Route) -> set[str]:
    """The headers the route's ``header_route`` filters set (lower case)."""
    return {f.config.header.lower() for f in spec.filters if f.name == ROUTING_FILTER}


def owned_headers(routes: list[Route]) -> list[str]:
    """The headers only Legation may set: those a ``header_route`` filter sets and no
    ``header_route`` rule reads, sorted. A client's own copy is removed before Envoy picks a route
    (:func:`legation.translate._listeners.http_listener`'s ``strip_headers``), so it cannot pick
    a header-routed route without the filter that decides it. A header some rule reads stays:
    that mesh routes on the client's value by design."""
    sets: set[str] = set()
    reads: set[str] = set()
    for spec in routes:
        sets |= routing_headers(spec)
        for f in spec.filters:
            if f.name == ROUTING_FILTER:
                for rule in f.config.rules:
                    if rule.header is not None:
                        reads.add(rule.header.lower())
                    if rule.jwt_claim is not None:
                        reads.add(rule.jwt_header.lower())
    return sorted(sets - reads)


def read_headers(spec: Route) -> set[str]:
    """The headers the route's match reads (lower case)."""
    return {m.name.lower() for m in spec.match.headers}


def _overlap(a: Route, b: Route) -> bool:
    """Whether one request could match both paths (conservative: True unless clearly not)."""

    def stem(r: Route) -> tuple[str, bool] | None:
        p = r.match.path
        if p.prefix is not None:
            return p.prefix, True
        if p.exact is not None:
            return p.exact, False
        return None

    sa, sb = stem(a), stem(b)
    if sa is None or sb is None:
        return True
    (pa, a_pre), (pb, b_pre) = sa, sb
    if a_pre and b_pre:
        return pa.startswith(pb) or pb.startswith(pa)
    if a_pre:
        return pb.startswith(pa)
    if b_pre:
        return pa.startswith(pb)
    return pa == pb


def routing_groups(routes: list[Route]) -> list[set[int]]:
    """Routes header routing can move a request between (see :mod:`._fused`, rule 4): from a
    route with routing filters setting H, to every route whose path overlaps its own and whose
    match reads H and, when the route itself reads H, to every later one (the header removed or
    changed, it may match no more)."""
    parent = list(range(len(routes)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    reads = [read_headers(r) for r in routes]
    for i, r in enumerate(routes):
        sets = routing_headers(r)
        if not sets:
            continue
        for j, s in enumerate(routes):
            later = j > i and reads[i] & sets
            if j != i and (reads[j] & sets or later) and _overlap(r, s):
                parent[find(j)] = find(i)
    out: dict[int, set[int]] = {}
    for i in range(len(routes)):
        out.setdefault(find(i), set()).add(i)
    return list(out.values())
