"""``legation up``'s proxies: an Envoy (enrolled first) and the demo apps for every proxy of the
mesh being served, started and retired as reloads add and remove them, and their xDS credentials
renewed before they expire."""

from __future__ import annotations

import asyncio
import hashlib
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from legation.capture.pods import Pods
from legation.certs.enrol import UP_TTL, Enrolments, enrol, node_dir_name, xds_root
from legation.certs.issuer import CaLocation
from legation.certs.workload import WorkloadCert
from legation.config import DemoSpec, Mesh, load_mesh
from legation.config.capture import with_capture
from legation.demo import DemoApp
from legation.envoy_process import EnvoyProcess
from legation.errors import LegationError
from legation.supervisor import Backoff, Supervised
from legation.translate.bootstrap import bootstrap


class StackProxies:
    """The Envoy-and-app half of :class:`legation.up.Stack` (a mixin over its state)."""

    mesh: Mesh | None
    mesh_path: Path
    log_dir: Path
    delta: bool
    ca_where: CaLocation | None
    apps: dict[tuple[str, int], DemoApp | Supervised]
    envoys: list[EnvoyProcess]
    _envoy_backoff: dict[str, Backoff]
    credentials: dict[str, WorkloadCert]
    _retiring: list[EnvoyProcess | DemoApp | Supervised]
    capture: bool
    pods: Pods | None
    _followed: str

    if TYPE_CHECKING:  # implemented by Stack

        def say(self, line: str) -> None: ...

        def _pod_envoy(self, node: str) -> dict[str, Any]: ...

        async def _pod_app(self, spec: DemoSpec, mesh: Mesh) -> Supervised | None: ...

        async def _redirect_pods(self, mesh: Mesh) -> None: ...

    async def _follow_apps(self, mesh: Mesh) -> None:
        """Start the demo apps ``mesh`` adds; those it removes stop once the Envoys no longer
        route to them (:meth:`_retire`)."""
        wanted = {(a.service, a.port): a for a in mesh.demo_apps()}
        for key in [k for k in self.apps if k not in wanted]:
            self._retiring.append(self.apps.pop(key))
        for key, spec in wanted.items():
            if key in self.apps:
                continue
            in_pod = await self._pod_app(spec, mesh)
            if in_pod is not None:
                self.apps[key] = in_pod
            else:
                app = DemoApp(
                    name=spec.service,
                    version=spec.version,
                    host=spec.host,
                    port=spec.port,
                    fail_every=spec.fail_every,
                    delay_ms=spec.delay_ms,
                    outbound=(spec.host, spec.outbound_port) if spec.outbound_port else None,
                )
                await app.start()
                self.apps[key] = app

    def _follow_proxies(self, status: dict[str, Any]) -> tuple[list[str], list[str]]:
        """Start an Envoy for each proxy the served mesh has and none runs for; those of proxies
        it no longer has stop once the others are in sync (no one routes to them any more).
        (started, stopping) node ids."""
        wanted = {p["node_id"]: p for p in status["proxies"]}
        running = {e.name for e in self.envoys}
        stopped = sorted(running - set(wanted))
        for envoy in [e for e in self.envoys if e.name in stopped]:
            self.envoys.remove(envoy)
            self._retiring.append(envoy)
            self.credentials.pop(envoy.name, None)
            self._envoy_backoff.pop(envoy.name, None)
        started = []
        host, _, port = str(status["xds"]).rpartition(":")
        for node, proxy in wanted.items():
            if node in running:
                continue
            cert, directory = self._enrol(node)
            self.credentials[node] = cert
            admin_port = int(proxy["admin"].rpartition(":")[2])
            pod = self._pod_envoy(node)  # with capture: in its pod, xDS over the bridge
            config = bootstrap(
                node_id=node,
                node_cluster=proxy.get("cluster", ""),
                xds_host=pod.pop("xds_host", host),
                xds_port=int(port),
                admin_host=pod.get("admin_host", "127.0.0.1"),
                admin_port=admin_port,
                delta=self.delta,
                credentials_dir=directory.resolve(),
            )
            envoy = EnvoyProcess(
                config, admin_port=admin_port, name=node, log_dir=self.log_dir, **pod
            )
            self.envoys.append(envoy.start())
            self._envoy_backoff[node] = Backoff(time.monotonic())
            started.append(node)
        return started, stopped

    def _restart_envoys(self) -> None:
        """Start an Envoy that exited again, after a backoff (see :class:`Backoff`), with the
        same bootstrap and credential: the rest of the mesh keeps running, and the new Envoy
        gets its configuration from the control plane as the first one did."""
        now = time.monotonic()
        for envoy in self.envoys:
            if envoy.alive():
                continue
            clock = self._envoy_backoff.setdefault(envoy.name, Backoff(now))
            wait = clock.wait(now)
            if not clock.announced:
                clock.announced = True
                code = envoy.proc.returncode if envoy.proc is not None else "?"
                self.say(
                    f"{envoy.name} exited (code {code}); restarting it in {wait:.1f}s "
                    f"(restart #{clock.restarts + 1}). Its log:\n{envoy.log_tail(20)}"
                )
            if wait == 0:
                envoy.start()
                clock.restarted(now)
                pid = envoy.proc.pid if envoy.proc is not None else "?"
                self.say(f"{envoy.name} restarted (pid {pid})")

    def _access_log_dirs(self, mesh: Mesh) -> None:
        """The folders of the proxies' JSON access-log files, made before their Envoys start
        (Envoy refuses a listener whose access-log file it cannot open)."""
        block = mesh.accesslog
        if block is None:
            return
        for proxy in mesh.proxies():
            log = block.log_of(proxy.node_id)
            if log.to != "file":
                continue
            folder = Path(log.path_for(proxy.node_id)).parent
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                self.say(f"cannot make {folder} for {proxy.node_id}'s access log: {err}")

    def _enrol(self, node: str) -> tuple[WorkloadCert, Path]:
        """A new xDS credential for ``node`` (its earlier one revoked), written to its files."""
        assert self.ca_where is not None
        where = self.ca_where
        directory = where.nodes_dir / node_dir_name(node)
        cert, _ = enrol(
            xds_root(where.home), Enrolments.beside(where.home), node, directory, ttl=UP_TTL
        )
        return cert, directory

    async def _follow_mesh(self, status: dict[str, Any]) -> None:
        """After a reload: the Envoys and demo apps of the proxies the served mesh has."""
        digest = _digest(self.mesh_path)
        if digest == self._followed or digest != status.get("mesh_digest"):
            return  # nothing new, or the file on disk is not the mesh being served
        try:
            mesh = load_mesh(self.mesh_path)
            if self.capture:
                mesh = with_capture(mesh, source=str(self.mesh_path))
            if self.pods is not None:
                await asyncio.to_thread(self.pods.follow, mesh)
                await self.pods.follow_relay()
                await self._redirect_pods(mesh)
            await self._follow_apps(mesh)
            self._access_log_dirs(mesh)
            started, stopped = self._follow_proxies(status)
        except (LegationError, OSError) as err:
            self.say(f"cannot follow the reloaded mesh's proxies: {err}")
            return
        self.mesh, self._followed = mesh, digest
        if started:
            self.say(f"new proxies in the mesh, their Envoys started: {', '.join(started)}")
        if stopped:
            self.say(
                f"proxies gone from the mesh, their Envoys stop once the others are in "
                f"sync: {', '.join(stopped)}"
            )

    async def _retire(self, status: dict[str, Any]) -> None:
        """Stop the Envoys and demo apps a reload removed, once every remaining Envoy has ACKed
        the mesh without them."""
        if not self._retiring or not all(p["in_sync"] for p in status["proxies"]):
            return
        names = []
        for gone in self._retiring:
            if isinstance(gone, EnvoyProcess):
                await asyncio.to_thread(gone.stop)
                names.append(gone.name)
            else:
                await gone.stop()
        self._retiring = []
        if names:
            self.say(f"Envoys stopped: {', '.join(names)}")

    def renew_credentials(self) -> list[str]:
        """Re-issue the Envoys' xDS credentials past 2/3 of their lifetime (files rewritten in
        place, the old ones revoked); their node ids."""
        now = datetime.now(UTC)
        due = [node for node, cert in self.credentials.items() if cert.due(now)]
        for node in due:
            try:
                self.credentials[node] = self._enrol(node)[0]
            except LegationError as err:
                self.say(f"cannot renew the xDS credential of {node}: {err}")
        if due:
            self.say(f"xDS credentials renewed for {len(due)} Envoys")
        return due


def _digest(path: Path) -> str:
    """The mesh file's digest as the control plane reports it (``mesh_digest``)."""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()[:8]
    except OSError:
        return ""
