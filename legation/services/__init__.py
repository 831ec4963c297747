"""The request-path services (ext_authz, ext_proc, rate limiting, and the access-log service)
as one model.

* :mod:`~legation.services.kinds`: the one table of service kinds (:data:`KINDS`), read by the
  embedded runner, ``legation serve``, the mesh checks and the translation;
* :mod:`~legation.services.base`: the :class:`Service` protocol each kind implements
  (:mod:`.extauthz`, :mod:`.extproc`, :mod:`.ratelimit`) and the :class:`ServiceSpec` it runs;
* :mod:`~legation.services.planning`: validation of a mesh's services, files and references, before
  anything is created;
* :mod:`~legation.services.embedded`: running them next to the control plane, swapping settings
  live;
* :mod:`~legation.services.workers`: ``legation serve --workers N`` (forked processes).

Only the table and the protocol are imported eagerly (the config package reads the table while
it is being imported); the rest is imported on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from legation.services.base import Invalid, Service, ServiceSpec, ServiceStartError
from legation.services.kinds import KINDS, ServiceKind

if TYPE_CHECKING:
    from legation.services.chains import route_chains
    from legation.services.embedded import EmbeddedServices
    from legation.services.planning import Plan, plan

__all__ = [
    "KINDS",
    "EmbeddedServices",
    "Invalid",
    "Plan",
    "Service",
    "ServiceKind",
    "ServiceSpec",
    "ServiceStartError",
    "plan",
    "route_chains",
]

_LAZY = {
    "EmbeddedServices": "legation.services.embedded",
    "Plan": "legation.services.planning",
    "plan": "legation.services.planning",
    "route_chains": "legation.services.chains",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'legation.services' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
