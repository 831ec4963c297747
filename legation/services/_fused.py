"""The fused call-out's part of the ext_authz service: its routes, its limiter, their live swaps.

The ext_authz service's HTTP call-out server decides fused routes (:mod:`legation.fastpath.fused`)
so it holds, beside the authz servicer, the mesh's fused routes (their ``header_route`` filters
created from the validated options) and a rate limiter built from the *rate-limit service's* own
plan (:meth:`legation.services.ratelimit.RateLimitService.settings`: same limits file, domain,
modes, backend and its options). An edit to the limits file or the routes is swapped in live, as
the rate-limit service swaps it; a new backend restarts the server (it is in the restart key).

The counters: with ``redis`` this limiter in every ext_authz worker and the rate-limit service
count in the one store. With ``memory`` each process has its own counters, so the translation
fuses rate limits only when every rate-limited route is fused and ext_authz runs one worker
(:mod:`legation.translate._fused`, rule 5): the gRPC service then counts nothing for the domain,
and no key is counted in two places.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from legation import plugins
from legation.config.extensions import FILTER_KIND

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from legation.config import Mesh
    from legation.fastpath.fused import FusedDecider, FusedRoute

__all__ = ["apply_fused", "close_fused", "fused_live", "restart_parts", "start_fused"]


def fused_live(mesh: Mesh, mesh_dir: Path) -> dict[str, Any] | None:
    """The fused part of the ext_authz service's plan, or None when no route is fused. Raises
    :class:`~legation.services.base.Invalid` when the rate-limit block's files do not validate
    (the rate-limit service's own planning reports the same)."""
    from legation.services.ratelimit import RateLimitService
    from legation.translate._fused import fused

    routes = fused(mesh)
    if not routes:
        return None
    limits = None
    if any(r.rate_limited for r in routes) and mesh.ratelimit is not None:
        spec = RateLimitService.settings(mesh, mesh_dir)
        limits = {**spec.live, "domain": mesh.ratelimit.domain}
        if mesh.extauthz is not None:  # failure_mode local: each call-out worker its share
            workers = mesh.extauthz.worker_count()
            limits["local_instances"] = limits["local_instances"] * workers
    return {"routes": tuple(routes), "ratelimit": limits}


def restart_parts(live: Mapping[str, Any] | None) -> Any:
    """What of the fused part needs a new server: the counter store."""
    limits = (live or {}).get("ratelimit")
    return None if limits is None else (limits["backend"], limits["backend_options"])


def _routes(live: Mapping[str, Any]) -> dict[str, FusedRoute]:
    from legation.fastpath.fused import FusedRoute

    out = {}
    for r in live["routes"]:
        filters = tuple(
            plugins.get(FILTER_KIND, "header_route").create(options) for options in r.routing
        )
        out[r.name] = FusedRoute(r.name, r.authz, filters, r.descriptors)
    return out


_NONE: Mapping[str, Any] = {"routes": (), "ratelimit": None}


async def start_fused(
    live: Mapping[str, Any] | None, registry: CollectorRegistry | None
) -> FusedDecider:
    """The decider for ``live`` (None: no fused route yet; routes swapped in later need no
    restart, a limiter does)."""
    live = live or _NONE
    from legation.fastpath.fused import FusedDecider, FusedRoutes
    from legation.ratelimit import service as rl

    limits = live["ratelimit"]
    servicer = None
    if limits is not None:
        settings = rl.Settings(
            backend=limits["backend"],
            backend_options=limits["backend_options"],
            failure_mode=limits["failure_mode"],
            local_instances=limits["local_instances"],
            registry=registry,
        )
        limiter = rl.build_limiter(settings, limits["config"])
        servicer = rl.RateLimitServicer(
            limiter, failure_mode=limits["failure_mode"], local_instances=limits["local_instances"]
        )
    decider = FusedDecider(
        FusedRoutes(_routes(live)),
        limits=servicer,
        domain=limits["domain"] if limits is not None else "",
    )
    if limits is not None:
        apply_fused(decider, live)
    return decider


def apply_fused(decider: FusedDecider, live: Mapping[str, Any] | None) -> None:
    """Swap new routes and limits into the running decider (same store: see the restart key);
    a route dropped is refused once Envoy stops sending it (see ``FusedRoutes``)."""
    from legation.services.ratelimit import swap_live

    live = live or _NONE
    decider.routes.swap(_routes(live))
    limits = live["ratelimit"]
    if limits is not None and decider.limits is not None:
        swap_live(decider.limits.limiter, decider.limits, limits)
        decider.domain = limits["domain"]


async def close_fused(decider: FusedDecider | None) -> None:
    if decider is not None and decider.limits is not None:
        await decider.limits.limiter.backend.close()
