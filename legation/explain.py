"""``legation explain [ROUTE] [--json] [--mesh MESH]``: per route, which request-path services a
request on it calls, over HTTP or gRPC, in how many hops, and why.

Nothing is decided here: each answer is the :class:`~legation.translate._hops.Hop` the
translation itself writes into the route (:func:`legation.translate._services.route_hops`, the
decisions :func:`~legation.translate._services.apply_services` applies), so what this prints is
what the proxies are configured to do. A hop is one call-out Envoy makes per request: services
fused into the one HTTP call (:mod:`legation.translate._fused`) share a hop, and a route that is
not fused says why.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from legation.errors import LegationError

if TYPE_CHECKING:
    from legation.config import Mesh
    from legation.config.routes import Route

__all__ = ["add_parser", "explain", "render"]


_LABEL = {"http": "HTTP", "grpc": "gRPC"}


def _where(route: Route) -> list[str]:
    out = ["gateway"] if route.on_gateway else []
    out += [f"sidecars calling {host}" for host in route.mesh_hosts]
    return out


def explain(mesh: Mesh, route: str | None = None) -> list[dict[str, Any]]:
    """One entry per route (or only ``route``): where it applies, its hops, every service's
    decision with its reason. Raises LookupError naming the routes when ``route`` is unknown."""
    from legation.translate._authz import FUSED_FILTERS
    from legation.translate._services import route_hops

    routes = [r for r in mesh.routes if route is None or r.name == route]
    if route is not None and not routes:
        known = ", ".join(r.name for r in mesh.routes) or "none"
        raise LookupError(f"no route {route!r} (routes: {known})")
    out = []
    for spec in routes:
        hops = route_hops(mesh, spec)
        # one call-out per filter: services fused into one HTTP call share theirs
        calls = list({h.filter: h for h in hops if h.calls}.values())
        out.append(
            {
                "route": spec.name,
                "applies_on": _where(spec),
                "hops": len(calls),
                "http": sum(h.protocol == "http" for h in calls),
                "grpc": sum(h.protocol == "grpc" for h in calls),
                "fused": [h.kind for h in hops if h.calls and h.filter in FUSED_FILTERS.values()],
                "services": [
                    {
                        "service": h.kind,
                        "calls": h.calls,
                        "protocol": h.protocol,
                        "filter": h.filter,
                        "cluster": h.cluster,
                        "reason": h.reason,
                    }
                    for h in hops
                ],
            }
        )
    return out


def render(entries: list[dict[str, Any]]) -> str:
    """The text form: a line per route, then a line per service."""
    lines = []
    for e in entries:
        where = " and ".join(e["applies_on"]) or "nowhere (no gateway, no mesh_hosts)"
        count = f"{e['hops']} hop{'' if e['hops'] == 1 else 's'}"
        if e["hops"]:
            count += f" ({e['http']} HTTP, {e['grpc']} gRPC)"
        if e["fused"]:
            count += f", fused: {' + '.join(e['fused'])}"
        lines.append(f"route {e['route']}: {count}, on the {where}")
        for s in e["services"]:
            if s["calls"]:
                lines.append(
                    f"  {s['service']:<10} {_LABEL[s['protocol']]:<5} {s['filter']} -> "
                    f"{s['cluster']}: {s['reason']}"
                )
            else:
                lines.append(f"  {s['service']:<10} {'-':<5} no call: {s['reason']}")
        if not e["services"]:
            lines.append("  (the mesh declares no request-path services)")
    return "\n".join(lines)


def cmd_explain(args: argparse.Namespace, default_mesh: Callable[[], Path]) -> int:
    from legation.config import load_mesh

    path = Path(args.mesh) if args.mesh else default_mesh()
    try:
        mesh = load_mesh(path)
        entries = explain(mesh, args.route)
    except LegationError as err:
        print(err, file=sys.stderr)
        return 1
    except LookupError as err:
        print(f"{path}: {err.args[0]}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"mesh": str(path), "routes": entries}, indent=2))
    else:
        print(render(entries))
    return 0


def add_parser(sub: Any, *, default_mesh: Callable[[], Path]) -> None:
    """Register ``explain`` on the ``legation`` command's subparsers."""
    p = sub.add_parser(
        "explain", help="per route: the services it calls, HTTP or gRPC, hops, and why"
    )
    p.add_argument("route", nargs="?", help="a route's name (default: every route)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--mesh", help="mesh file (default examples/quickstart/mesh.yaml)")
    p.set_defaults(fn=lambda args: cmd_explain(args, default_mesh))
