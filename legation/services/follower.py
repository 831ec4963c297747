"""``legation serve <kind> --plan FILE``: one request-path service in a process of its own,
following the plan the control plane publishes (:mod:`legation.services.published`).

The process plans its own service from the accepted mesh in the file (the same
:meth:`~legation.services.base.Service.settings` the control plane validated with, relative paths
against the mesh's folder) and runs it with :class:`~legation.services.embedded.EmbeddedServices`,
so a changed plan is swapped in live (ext_authz config and checks, chains, limits and modes) and
only a new address or TLS setting restarts the server, inside this process. It checks the file
every ``poll`` seconds; it never needs the control plane to be running: a plan that cannot be
applied is logged and the running config stays. With mTLS, the certificate files beside the plan
are read before each handshake (:class:`~legation.services.published.FileTls`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from prometheus_client import Metric

from legation.certs._files import write_private
from legation.config import parse_mesh
from legation.config.tracing import tracing_tls
from legation.errors import LegationError
from legation.services.base import Invalid
from legation.services.embedded import EmbeddedServices
from legation.services.kinds import get
from legation.services.planning import Plan
from legation.services.published import FileTls, ServicePlan, metrics_port_file, read_plan

log = logging.getLogger("legation.services.follower")

__all__ = ["Follower"]


class Follower:
    """The service of one plan file, kept matching it."""

    def __init__(self, plan_file: Path, *, kind: str, worker: int = 0, poll: float = 0.25) -> None:
        """``worker``: which of the service's workers this process is (it binds that worker's
        port, ``port + 100 * worker``)."""
        self.plan_file = plan_file
        self.kind = kind
        self.worker = worker
        self.poll = poll
        self.tls = FileTls(plan_file.parent)
        self.services = EmbeddedServices(
            on_event=lambda line: log.info("%s", line), tls_source=lambda _kind: self.tls()
        )
        self.current: ServicePlan | None = None
        self._raw = b""
        self._metrics: Any = None

    async def start(self) -> int:
        """Serve the plan in the file; its port. Raises LegationError when it cannot (no
        readable plan, an invalid one, a port that cannot be bound): nothing is left running."""
        try:
            self._raw = self.plan_file.read_bytes()
            plan = read_plan(self.plan_file)
        except (OSError, ValueError, TypeError, KeyError) as err:
            raise LegationError(
                f"{self.plan_file}: no readable plan: {err}", code="plan_unreadable"
            ) from None
        failures = await self.services.apply(self._target(plan))
        if failures:
            await self.services.stop()
            raise LegationError("\n".join(failures), code="service_start_failed")
        self.current = plan
        return self.services.running[self.kind].port

    async def follow(self) -> None:
        """Check the plan file every ``poll`` seconds, until cancelled; returns when the service
        is no longer running (a new address it could not bind: the process should exit so its
        supervisor starts it again)."""
        while True:
            await asyncio.sleep(self.poll)
            await self.check()
            if self.kind not in self.services.running:
                log.error("%s: the %s service is not running any more", self.plan_file, self.kind)
                return

    async def check(self) -> bool:
        """Apply the plan file if it changed; True if a new plan was applied."""
        try:
            raw = self.plan_file.read_bytes()
        except OSError:
            return False  # being replaced, or the control plane cleared it: keep serving
        if raw == self._raw:
            return False
        self._raw = raw
        try:
            plan = read_plan(self.plan_file)
            target = self._target(plan)
        except (OSError, ValueError, TypeError, KeyError, LegationError) as err:
            log.error(
                "%s: cannot apply the new plan, the running config stays: %s", self.plan_file, err
            )
            return False
        failures = await self.services.apply(target)
        if failures:
            return False
        self.current = plan
        log.info("%s service follows the plan of inputs %s", self.kind, plan.inputs)
        return True

    async def stop(self, grace: float = 1.0) -> None:
        await self.services.stop()
        if self._metrics is not None:
            self._metrics.shutdown()
            self._metrics.server_close()

    def serve_metrics(self, port: int = 0) -> int:
        """Serve the running service's metrics on ``127.0.0.1:port`` (0: an ephemeral port,
        written beside the plan for the control plane's ``/metrics``); the bound port."""
        from prometheus_client import CollectorRegistry, start_http_server

        registry = CollectorRegistry()
        registry.register(
            WorkerLabelled(lambda: self.services.running.get(self.kind), self.worker)  # type: ignore[arg-type]
        )
        self._metrics, _ = start_http_server(port, addr="127.0.0.1", registry=registry)
        bound = int(self._metrics.server_port)
        where = self.plan_file.parent / metrics_port_file(self.worker)
        try:
            write_private(where, str(bound).encode())
        except OSError as err:
            log.warning("cannot write %s: %s", where, err)
        return bound

    def _target(self, plan: ServicePlan) -> Plan:
        if plan.kind != self.kind:
            raise LegationError(
                f"{self.plan_file}: a plan for {plan.kind}, not {self.kind}", code="plan_mismatch"
            )
        mesh = parse_mesh(plan.mesh_text, source=plan.mesh_path)
        kind = get(self.kind)
        cls = kind.service_class()
        try:
            spec = cls.settings(mesh, Path(plan.mesh_path).resolve().parent)
            block = kind.block_of(mesh)
            spec = replace(spec, workers=block.worker_count() if block else 1)
        except Invalid as err:
            raise LegationError(
                f"{plan.mesh_path}: {self.kind}.{err.field}: {err}", code="invalid_plan"
            ) from None
        if self.worker >= spec.workers:
            raise LegationError(
                f"{self.plan_file}: worker {self.worker} of a service with {spec.workers}",
                code="plan_mismatch",
            )
        return Plan(
            embedded={self.kind: replace(spec, tls=plan.tls, worker=self.worker)},
            remote={},
            tracing=mesh.tracing,
            tracing_tls=tracing_tls(mesh),
        )


class WorkerLabelled:
    """A collector for whatever service ``current()`` returns now (a restart replaces it; None:
    nothing), every sample labelled ``worker``."""

    def __init__(self, current: Callable[[], Any], worker: int) -> None:
        self.current = current
        self.worker = str(worker)

    def collect(self) -> Iterator[Metric]:
        service = self.current()
        if service is None:
            return
        for family in service.registry.collect():
            labelled = Metric(family.name, family.documentation, family.type, family.unit)
            labelled.samples = [
                s._replace(labels={**s.labels, "worker": self.worker}) for s in family.samples
            ]
            yield labelled
