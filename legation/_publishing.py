"""Publishing a translated mesh to the snapshot cache, with make-before-break for new sidecars:
their endpoints reach the other proxies only once their own Envoy is in sync."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import Gauge

from legation.certs import MeshIssuer
from legation.config import Mesh
from legation.translate import translate
from legation.xds.cache import SnapshotCache
from legation.xds.snapshot import Snapshot
from legation.xds.types import ResourceType

HOLD_NEW_MAX = 15.0  # seconds a new sidecar's endpoint waits for its Envoy to be in sync


class Publishing:
    """The publishing half of :class:`legation.controlplane.ControlPlane` (a mixin over its
    state)."""

    generation: int
    issuer: MeshIssuer
    cache: SnapshotCache
    snapshots: dict[str, Snapshot]
    mesh: Mesh | None
    on_event: Callable[[str], None]
    _hold: asyncio.Task[None] | None
    _digest: str
    _generation: Gauge

    def _publish(self, mesh: Mesh, text: bytes, *, hold_new: bool = False) -> None:
        """Translate ``mesh`` and publish it (see :meth:`_publish_translated`)."""
        self._publish_translated(mesh, text, self._translations(mesh, text, hold_new=hold_new))

    async def _publish_off_loop(self, mesh: Mesh, text: bytes, *, hold_new: bool = False) -> None:
        """:meth:`_publish` with the translation in a thread, so that the services that share
        this event loop keep answering while a large mesh is translated."""
        translated = await asyncio.to_thread(self._translations, mesh, text, hold_new=hold_new)
        self._publish_translated(mesh, text, translated)

    def _translations(
        self, mesh: Mesh, text: bytes, *, hold_new: bool
    ) -> tuple[dict[str, Snapshot], dict[str, Snapshot], frozenset[str]]:
        """(every proxy's snapshot, what is served now, the new sidecars held back)."""
        version = f"g{self.generation + 1}-{hashlib.sha256(text).hexdigest()[:8]}"
        secrets = self.issuer.secrets()
        snapshots = translate(mesh, version=version, secrets=secrets)
        new = frozenset(
            {p.node_id for p in mesh.proxies() if p.kind == "sidecar"} - set(self.snapshots)
            if hold_new and self.snapshots
            else set()
        )
        if not new:
            return snapshots, snapshots, new
        gated = translate(_without_sidecars(mesh, new), version=version, secrets=secrets)
        served = {n: s if n in new else gated.get(n, s) for n, s in snapshots.items()}
        return snapshots, served, new

    def _publish_translated(
        self,
        mesh: Mesh,
        text: bytes,
        translated: tuple[dict[str, Snapshot], dict[str, Snapshot], frozenset[str]],
    ) -> None:
        """Publish: ``hold_new`` (a reload): the endpoints of sidecars new in this generation
        reach the other proxies only once their own Envoy is in sync (or after
        :data:`HOLD_NEW_MAX` seconds), so no one is routed to an instance whose sidecar is not
        listening yet; the new sidecars get their own config at once."""
        digest = hashlib.sha256(text).hexdigest()[:8]
        snapshots, served, new = translated
        self._cancel_hold()
        if new:
            self._hold = asyncio.get_running_loop().create_task(self._release(snapshots, new))
        for node, snap in served.items():
            self.cache.set_snapshot(node, snap)
        for gone in set(self.snapshots) - set(served):
            self.cache.clear_snapshot(gone)
        self.mesh, self.snapshots, self._digest = mesh, served, digest
        self.generation += 1
        self._generation.set(self.generation)

    def _cancel_hold(self) -> None:
        if self._hold is not None:
            self._hold.cancel()
            self._hold = None

    async def _release(self, full: dict[str, Snapshot], new: frozenset[str]) -> None:
        deadline = time.monotonic() + HOLD_NEW_MAX
        while time.monotonic() < deadline and not all(self._in_sync(n) for n in new):
            await asyncio.sleep(0.05)
        ready = all(self._in_sync(n) for n in new)
        for node, snap in full.items():
            if self.snapshots.get(node) is not snap:
                self.cache.set_snapshot(node, snap)
                self.snapshots[node] = snap
        self._hold = None
        self.on_event(
            (
                "new sidecars in sync, their endpoints published: "
                if ready
                else f"new sidecars not in sync after {HOLD_NEW_MAX:g}s, their endpoints "
                f"published anyway: "
            )
            + ", ".join(sorted(new))
        )

    def _in_sync(self, node: str) -> bool:
        status, snap = self.cache.status.get(node), self.snapshots.get(node)
        if status is None or snap is None:
            return False
        acked: Any = status.as_dict()["acked"]
        return all(acked.get(t.short) == snap.version(t) for t in ResourceType if snap.resources(t))

    def _republish(self, nodes: list[str]) -> None:
        if self.mesh is None:
            return
        version = f"g{self.generation}-{self._digest}"
        fresh = translate(self.mesh, version=version, secrets=self.issuer.secrets())
        for node in nodes:
            self.cache.set_snapshot(node, fresh[node])
            self.snapshots[node] = fresh[node]


def _without_sidecars(mesh: Mesh, nodes: frozenset[str] | set[str]) -> Mesh:
    """``mesh`` without the endpoints whose sidecars are ``nodes`` (every endpoint keeps its
    instance name, so the others translate exactly as in ``mesh``)."""
    from legation.config.proxies import sidecar_node_id

    services = []
    for service in mesh.services:
        kept = [
            ep.model_copy(update={"name": service.instance_name(i)})
            for i, ep in enumerate(service.endpoints)
            if ep.sidecar is None or sidecar_node_id(service.instance_name(i)) not in nodes
        ]
        services.append(service.model_copy(update={"endpoints": kept}))
    return mesh.model_copy(update={"services": services})
