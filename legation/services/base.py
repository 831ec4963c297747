"""What every request-path service is to the rest of Legation: a :class:`Service`, planned from a
:class:`ServiceSpec`.

A spec is the validated settings of one service for one mesh generation. It splits them in two:
``restart_key`` covers what needs a new server (address, TLS, a counter store), ``live`` what a
running service swaps in place (its config files' content, chains, modes). ``watched`` lists the
files and folders whose edits must re-validate the service without a change to ``mesh.yaml``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from legation.errors import LegationError
from legation.services.kinds import WORKER_PORT_STEP

if TYPE_CHECKING:
    import grpc
    from prometheus_client import CollectorRegistry

    from legation.config import Mesh
    from legation.grpc_server import TlsSource

__all__ = ["GrpcServiceParts", "Invalid", "Service", "ServiceSpec", "ServiceStartError", "spec_key"]


class ServiceStartError(LegationError):
    """An embedded service could not start (its port is taken, its checks failed to start)."""


class Invalid(Exception):
    """A service's settings are invalid: ``field`` is the path below the service's mesh block
    (``config``, ``domain``, ``merge_domains``), the message names any other file involved."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def spec_key(*parts: Any) -> str:
    """A short stable digest of JSON-able ``parts`` (what decides a restart)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True, kw_only=True)
class ServiceSpec:
    """One embedded service to run: where, and with what."""

    kind: str
    host: str
    port: int
    restart_key: str
    """Changes iff the running service must be replaced (address, TLS, backend)."""
    live: Mapping[str, Any] = field(default_factory=dict)
    """What :meth:`Service.apply` swaps in place: the kind's validated settings."""
    watched: tuple[Path, ...] = ()
    """Files and folders whose edits re-run the validation (config files, a policy dir)."""
    tls: bool = False
    """Serve mesh mTLS (the certificate comes from the control plane's tls source)."""
    workers: int = 1
    """Processes serving it, worker i on ``port + 100 i`` (the block's ``worker_ports``)."""
    worker: int = 0
    """Which of them this one is: it binds ``bind_port(port)``."""

    def bind_port(self, base: int) -> int:
        """This worker's port for the service port ``base`` (0, ephemeral, stays 0)."""
        return base + WORKER_PORT_STEP * self.worker if base else 0


class Service(Protocol):
    """One request-path service kind, and a running instance of it.

    The class methods plan and serve from the command line; an instance is one running server.
    Implementations: :class:`~legation.services.extauthz.AuthzService`,
    :class:`~legation.services.extproc.ExtProcService`,
    :class:`~legation.services.ratelimit.RateLimitService`."""

    kind: ClassVar[str]
    spec: ServiceSpec
    """The spec it runs (replaced by :meth:`apply`)."""
    port: int
    """Its bound port once started."""

    @classmethod
    def settings(cls, mesh: Mesh, mesh_dir: Path) -> ServiceSpec:
        """Validate this kind's mesh block (and every file it names, read relative to
        ``mesh_dir``, the mesh file's folder) into a spec; nothing is created. Raise
        :class:`Invalid` naming the field below the block. Called only when the block is
        present and ``embedded``; TLS is filled in by the caller."""
        ...

    @classmethod
    def references(cls, mesh: Mesh, spec: ServiceSpec) -> list[tuple[str, str]]:
        """What routes ask of this service that its config does not define, as
        ``(mesh field path, message)``: e.g. a route's ``authz`` package that no policy in the
        policy directory declares. Empty when every reference resolves."""
        ...

    def __init__(self, spec: ServiceSpec, *, tls: TlsSource | None) -> None:
        """Hold ``spec``; nothing is bound until :meth:`start`."""
        ...

    async def start(self) -> int:
        """Bind and start the server (via :func:`legation.grpc_server.start_grpc_server`);
        return the bound port. Raises ``BindError``/``LegationError`` and leaves nothing
        running when it cannot."""
        ...

    async def apply(self, spec: ServiceSpec) -> None:
        """Swap ``spec.live`` into the running service without a restart: calls already in
        flight finish on what they started with. Only called when ``spec.restart_key`` equals
        the running one (else the caller stops this service and starts a new one). Raises
        ``LegationError`` and keeps the running config when the new one cannot be built."""
        ...

    async def stop(self, grace: float) -> None:
        """Stop serving (in-flight calls get ``grace`` seconds) and release what it holds
        (checks' processes, watchers, the counter store's connections)."""
        ...

    @property
    def registry(self) -> CollectorRegistry:
        """This instance's Prometheus registry (served on the control plane's /metrics)."""
        ...

    def status(self) -> dict[str, Any]:
        """What ``/status`` shows about it: address, TLS, and the kind's own details."""
        ...

    @classmethod
    def add_cli_options(cls, parser: argparse.ArgumentParser) -> None:
        """Add this kind's own options to its ``legation serve <kind>`` parser."""
        ...

    @classmethod
    async def serve_cli(
        cls, args: argparse.Namespace, *, host: str, port: int, reuse_port: bool
    ) -> tuple[grpc.aio.Server, int, Any]:
        """``legation serve <kind>``: start from the command line's options (``--config`` is
        the service's own file); return the server, its port and an ``async stop(grace)``."""
        ...


class GrpcServiceParts:
    """What a :class:`Service` whose instance is one grpc.aio server shares with the others: its
    ``stop``, its metrics ``registry`` and an empty ``status`` (the runner reports the address
    and TLS). Set ``server`` and ``_registry`` in ``__init__``."""

    server: grpc.aio.Server | None
    _registry: CollectorRegistry

    async def stop(self, grace: float) -> None:
        if self.server is not None:
            await self.server.stop(grace)

    @property
    def registry(self) -> CollectorRegistry:
        return self._registry

    def status(self) -> dict[str, Any]:
        return {}  # address and TLS are reported by the runner
