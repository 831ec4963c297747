"""The one table of request-path service kinds: ext_authz, ext_proc, rate limiting, and the
access-log service every proxy streams finished requests to (golden metrics).

Everything that needs "which services exist" reads :data:`KINDS`: the embedded runner
(:mod:`legation.services.embedded`), ``legation serve`` (its choices and each kind's options),
the mesh checks (ports, reserved SPIFFE names) and the translation (filters, clusters). Adding a
kind is one entry here, its mesh block in :class:`legation.config.Mesh`, and a class that
implements :class:`~legation.services.base.Service`.

The order is Envoy's filter order: ext_authz denies first, ext_proc may set headers that the
rate-limit descriptors read, and rate limiting counts only requests about to be forwarded. The
access-log service is no filter: it comes last.

This module imports nothing of the services themselves (the config package reads it while it
is being imported): a kind's class is imported on first use.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from legation.config import Mesh
    from legation.config.extensions import GrpcService
    from legation.services.base import Service

__all__ = ["KINDS", "WORKER_PORT_STEP", "ServiceKind", "blocks", "get", "names"]

WORKER_PORT_STEP = 100
"""Worker i of a service listens on ``port + 100 * i`` (adjacent service ports stay valid)."""


@dataclass(frozen=True, kw_only=True)
class ServiceKind:
    """One kind of request-path service."""

    name: str
    """Its name: ``legation serve <name>``, its SPIFFE identity ``legation-<name>``, labels."""
    block: str
    """The :class:`~legation.config.Mesh` attribute holding its block."""
    service: str
    """``module:Class`` implementing :class:`~legation.services.base.Service`."""
    envoy: str
    """``module:Class`` with its Envoy side: ``http_filter``, ``cluster``, ``per_route``."""
    help: str
    """One line for ``legation serve --help``."""
    traces: bool = True
    """Whether it records spans (exported with its own certificate when the hop is mTLS)."""

    def service_class(self) -> type[Service]:
        cls: type[Service] = _load(self.service)
        return cls

    def envoy_side(self) -> Any:
        return _load(self.envoy)

    def block_of(self, mesh: Mesh) -> GrpcService | None:
        block: Any = getattr(mesh, self.block)
        return block  # type: ignore[no-any-return]


# one entry per kind, laid out as a table
# fmt: off
KINDS: tuple[ServiceKind, ...] = (
    ServiceKind(name="extauthz", block="extauthz",
                service="legation.services.extauthz:AuthzService",
                envoy="legation.translate._authz:AuthzSide",
                help="ext_authz: JWT and Rego checks (Authorization/Check)"),
    ServiceKind(name="extproc", block="extproc",
                service="legation.services.extproc:ExtProcService",
                envoy="legation.translate._extproc:ExtProcSide",
                help="ext_proc: filter chains (ExternalProcessor/Process)"),
    ServiceKind(name="ratelimit", block="ratelimit",
                service="legation.services.ratelimit:RateLimitService",
                envoy="legation.translate._services:RateLimitSide",
                help="rate limiting, envoyproxy/ratelimit compatible (RateLimitService)"),
    ServiceKind(name="accesslog", block="accesslog",
                service="legation.services.accesslog:AccessLogService",
                envoy="legation.translate._accesslog:AccessLogSide",
                help="access-log service: golden metrics from every proxy (AccessLogService)",
                traces=False),
)
# fmt: on


def _load(target: str) -> Any:
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def names() -> tuple[str, ...]:
    return tuple(k.name for k in KINDS)


def get(name: str) -> ServiceKind:
    for kind in KINDS:
        if kind.name == name:
            return kind
    raise KeyError(name)


def blocks(mesh: Mesh) -> list[tuple[ServiceKind, GrpcService]]:
    """The kinds ``mesh`` declares, with their blocks, in :data:`KINDS` order."""
    out = []
    for kind in KINDS:
        block = kind.block_of(mesh)
        if block is not None:
            out.append((kind, block))
    return out
