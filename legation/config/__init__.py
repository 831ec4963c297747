"""The mesh model (``mesh.yaml``): load it, validate it, ask it what to run.

>>> mesh = load_mesh("examples/quickstart/mesh.yaml")   # doctest: +SKIP
>>> [p.node_id for p in mesh.proxies()]                  # doctest: +SKIP

:func:`load_mesh` and :func:`parse_mesh` raise :class:`~legation.errors.ConfigError` (precisely a
:class:`MeshConfigError`, whose ``problems`` list every problem) with one line per problem:
``<file>: <field path>: <message>``.
"""

from legation.config.errors import MeshConfigError, Problem
from legation.config.load import load_mesh, parse_mesh
from legation.config.model import (
    Demo,
    Endpoint,
    Gateway,
    Mesh,
    Service,
    Sidecar,
    Subset,
    XdsAddress,
)
from legation.config.mtls import Mtls
from legation.config.proxies import DemoSpec, ListenerSpec, ProxySpec
from legation.config.routes import Route

__all__ = [
    "Demo",
    "DemoSpec",
    "Endpoint",
    "Gateway",
    "ListenerSpec",
    "Mesh",
    "MeshConfigError",
    "Mtls",
    "Problem",
    "ProxySpec",
    "Route",
    "Service",
    "Sidecar",
    "Subset",
    "XdsAddress",
    "load_mesh",
    "parse_mesh",
]
