"""The control plane's reload loop: watch the mesh file and the files its services read, run the
one validation phase (nothing is created before it passes), issue certificates, let the services
follow, publish; or reject the change, report it and keep serving what runs."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client import Counter

from legation.certs import MeshIssuer
from legation.certs.rotation import Rotation
from legation.certs.spiffe import TRACING
from legation.config import Mesh, load_mesh
from legation.config.capture import capture_change_problems, with_capture
from legation.config.errors import MeshConfigError
from legation.config.tracing import tracing_tls
from legation.errors import LegationError
from legation.services import EmbeddedServices, Plan
from legation.services.planning import config_files, one_worker, plan, watched_digest
from legation.services.published import PublishedServices
from legation.tracing.receiver import EmbeddedCollector, PeerCheck
from legation.translate import translate


class Reloading:
    """The reload half of :class:`legation.controlplane.ControlPlane` (a mixin over its state;
    publishing is :class:`legation._publishing.Publishing`)."""

    mesh_path: Path
    mesh: Mesh | None
    status_port: int
    poll_interval: float
    embedded_services: bool
    capture: bool
    generation: int
    last_error: str | None
    on_event: Callable[[str], None]
    issuer: MeshIssuer
    rotation: Rotation
    services: EmbeddedServices | PublishedServices
    collector: EmbeddedCollector
    _reloads: Counter
    _watched: tuple[Path, ...]
    _inputs: str
    _text: str
    _rejected: str
    _digest: str

    if TYPE_CHECKING:  # implemented by Publishing, the next base of ControlPlane

        async def _publish_off_loop(
            self, mesh: Mesh, text: bytes, *, hold_new: bool = False
        ) -> None: ...

    def _validate(self, text: bytes) -> tuple[Mesh, Plan]:
        """The one validation phase: the mesh, its services' files and references, and the
        translation (without certificates). Raises LegationError; creates nothing."""
        mesh = load_mesh(self.mesh_path)
        if self.capture:
            mesh = with_capture(mesh, source=str(self.mesh_path))
        changed = capture_change_problems(self.mesh, mesh) if self.mesh is not None else []
        if changed:
            raise MeshConfigError(str(self.mesh_path), changed)
        if isinstance(self.services, EmbeddedServices):
            mesh = one_worker(mesh)  # in this process: one server each, one endpoint each
        self._watched = config_files(mesh, self.mesh_path.parent) + self._watched
        reserved = {self.status_port: "the control plane's status endpoint (--status-port)"}
        services = plan(
            mesh,
            mesh_path=self.mesh_path,
            embedded=self.embedded_services,
            reserved=reserved if self.status_port else {},
        )
        self._watched = tuple(
            dict.fromkeys(config_files(mesh, self.mesh_path.parent) + services.watched)
        )
        translate(mesh, version="check")
        self._inputs = self._digest_of(text)
        self._text = text.decode("utf-8", "replace")
        return mesh, services

    def _digest_of(self, text: bytes) -> str:
        return hashlib.sha256(text).hexdigest()[:8] + "-" + watched_digest(self._watched)

    def _issue(self, mesh: Mesh, services: Plan) -> None:
        """Certificates for the accepted mesh's proxies and mTLS services (a CA that cannot be
        opened raises a LegationError and leaves them as they were)."""
        tls = {k: s.host for k, s in services.embedded.items() if s.tls}
        if tracing_tls(mesh) and mesh.tracing is not None:
            tls[TRACING] = mesh.tracing.address()[0]  # the embedded trace receiver's
        self.issuer.update(mesh, services=tls)
        self.rotation.changed()

    async def reload(self) -> bool:
        """Read the mesh and its services' files again; True if they changed and were applied.
        The embedded services follow first (new chains are served before routes name them),
        then the snapshots (only when the mesh file itself changed)."""
        try:
            text = self.mesh_path.read_bytes()
        except OSError as err:
            return self._reject(f"{self.mesh_path}: cannot read: {err.strerror or err}")
        inputs = self._digest_of(text)
        if inputs in (self._inputs, self._rejected):
            return False
        served, served_text = self._inputs, self._text
        try:  # off the loop: compiling policies may take a while, the loop serves meanwhile
            mesh, services = await asyncio.to_thread(self._validate, text)
            mesh_changed = hashlib.sha256(text).hexdigest()[:8] != self._digest
            if mesh_changed:
                self._issue(mesh, services)
        except LegationError as err:
            self._rejected, self._inputs = self._digest_of(text), served
            self._text = served_text
            return self._reject(str(err))
        before = {p.node_id for p in self.mesh.proxies()} if self.mesh else set()
        failures = await self.services.apply(services)
        try:
            await self.collector.follow(mesh.tracing, peers=trace_peers(mesh))
        except LegationError as err:
            failures.append(f"tracing: {err} (the running receiver stays)")
        self.last_error = "\n".join(failures) or None
        self._rejected = ""
        self._reloads.labels("applied").inc()
        if not mesh_changed:
            self.on_event(f"service config reloaded, still generation {self.generation}")
            return True
        await self._publish_off_loop(mesh, text, hold_new=True)
        self.on_event(f"mesh reloaded: generation {self.generation} ({self._digest})")
        added = {p.node_id for p in mesh.proxies()} - before
        if added:
            self.on_event(
                "new proxies in the mesh (`legation up` starts an Envoy for each): "
                + ", ".join(sorted(added))
            )
        return True

    def _reject(self, message: str) -> bool:
        self.last_error = message
        self._reloads.labels("rejected").inc()
        self.on_event(
            f"mesh change rejected, still serving generation {self.generation}:\n{message}"
        )
        return False

    def _set_error(self, message: str) -> None:
        self.last_error = message

    async def _watch(self) -> None:
        last = ""
        while True:
            await asyncio.sleep(self.poll_interval)
            try:
                text = self.mesh_path.read_bytes()
            except OSError:
                text = b""
            now = self._digest_of(text)
            if now != last:  # still being written: wait for it to hold still for one poll
                last = now
                continue
            await self.reload()


def trace_peers(mesh: Mesh) -> PeerCheck | None:
    """Who may export spans to the embedded receiver: None (anyone, plaintext) unless the hop
    is mesh mTLS."""
    return PeerCheck.of(mesh) if tracing_tls(mesh) else None
