"""The ext_proc chains a mesh's routes ask for: one per route with ``filters``, named after it.

Filter options are validated once, when the mesh loads (each :class:`FilterSpec` keeps its
plugin's typed config); the plugin instances are created here once per loaded mesh and shared by
the plan (the running service) and the translation (which reads the filters' phases).
"""

from __future__ import annotations

from legation import plugins
from legation.config import Mesh
from legation.config.extensions import FILTER_KIND
from legation.extproc.chain import Chain
from legation.extproc.config import Chains

__all__ = ["route_chains"]


def route_chains(mesh: Mesh) -> Chains:
    """The routes' chains; each fails open only if the ``extproc`` block says so."""
    cached: Chains | None = mesh._route_chains
    if cached is not None:
        return cached
    fail_open = mesh.extproc.fail_open if mesh.extproc is not None else False
    chains: dict[str, Chain] = {}
    for route in mesh.routes:
        if not route.filters:
            continue
        filters = [
            plugins.get(FILTER_KIND, spec.name).create(spec.config) for spec in route.filters
        ]
        chains[route.name] = Chain(name=route.name, filters=filters, fail_open=fail_open)
    built = Chains(chains=chains)
    mesh._route_chains = built
    return built
