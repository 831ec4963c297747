"""``legation up``: the control plane, the request-path services, a real Envoy per proxy, and the
demo apps, in one command.

``legation up`` is a supervisor. The mesh is validated first (an invalid one starts nothing); then
it starts, as child processes of its own, the control plane (``legation serve xds
--services-dir .legation/services``) and the worker processes of each request-path service the
mesh embeds (``legation serve <kind> --plan .legation/services/<kind>/plan.json --worker I``, the
block's ``workers``: ext_authz, ext_proc, rate limiting), then the demo apps and the Envoys. It
waits until every Envoy has ACKed its configuration, prints where to send requests, then shows a
live status (a table on a terminal, log lines otherwise).

The data path does not depend on the control plane: the services follow the plan the control
plane publishes (a live change is swapped in without a restart) and keep serving their last good
config while it is away. Any Legation process that dies is started again (backoff from 0.5 s to
10 s, each restart logged and counted); the Envoys keep running meanwhile and reconnect to the
control plane by themselves. ``legation status --json`` lists the processes (role, PID, restarts).
A reload that adds proxies starts their Envoys (and demo apps); one that removes proxies stops
theirs. An Envoy that dies is started again the same way (same backoff, same bootstrap and
credential). Ctrl-C or SIGTERM stops everything; every child is tied to this process with
PR_SET_PDEATHSIG, so none is orphaned even if this process is killed.

Each Envoy is enrolled before it starts: its xDS credential (valid :data:`UP_TTL`) is written to
``.legation/nodes/<node>`` and its bootstrap reads it through file-based SDS with a watched
directory. Credentials are short-lived so a copied file is worth little for long; the stack
re-issues each one at 2/3 of its lifetime and rewrites the file in place, so an Envoy that lives
longer than its first credential reconnects (after a control-plane restart or a dropped stream)
with a current one, without a restart of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, TextIO

from legation._up_capture import StackCapture
from legation._up_children import StackChildren
from legation._up_ebpf import StackSplice
from legation._up_proxies import StackProxies, _digest
from legation._up_view import StackView, _Recent
from legation.capture.pods import Pods
from legation.certs.issuer import DEFAULT_CA_DIR, CaLocation, locate_ca
from legation.certs.workload import WorkloadCert
from legation.config import Mesh, load_mesh
from legation.config.capture import with_capture
from legation.controlplane import DEFAULT_STATUS_PORT
from legation.demo import DemoApp
from legation.envoy_process import EnvoyProcess
from legation.errors import LegationError
from legation.services.planning import plan
from legation.supervisor import Backoff, Supervised
from legation.translate import translate

QUICKSTART = Path(__file__).resolve().parent.parent / "examples" / "quickstart" / "mesh.yaml"
STATE_DIR = DEFAULT_CA_DIR.parent  # .legation
log = logging.getLogger("legation.up")


class Stack(StackChildren, StackProxies, StackView, StackSplice, StackCapture):
    def __init__(
        self,
        mesh_path: Path,
        *,
        delta: bool = False,
        status_port: int = DEFAULT_STATUS_PORT,
        log_dir: Path | None = None,
        out: TextIO = sys.stdout,
        ready_timeout: float = 60.0,
        live: bool | None = None,
        state_dir: Path = STATE_DIR,
        ebpf: bool = False,
        capture: bool = False,
    ) -> None:
        self.mesh_path = mesh_path
        self.ebpf = ebpf
        self.splice = None
        self.capture = capture  # --capture (a mesh with a capture: block captures without it)
        self.pods: Pods | None = None
        self.delta = delta
        self.out = out
        self.log_dir = log_dir or state_dir / "logs"
        self.ready_timeout = ready_timeout
        self.live = out.isatty() if live is None else live
        self.status_port = status_port
        self.state_dir = state_dir
        self.services_dir = state_dir / "services"
        self.processes_file = state_dir / "processes.json"
        self._recent: _Recent | None = None
        self._banner: list[str] = []
        self.mesh: Mesh | None = None
        self.ca_where: CaLocation | None = None
        self.cp: Supervised | None = None
        self.services: dict[str, Supervised] = {}
        self.apps: dict[tuple[str, int], DemoApp | Supervised] = {}
        self.envoys: list[EnvoyProcess] = []
        self._envoy_backoff: dict[str, Backoff] = {}  # node -> when its Envoy may start again
        self._stopping = asyncio.Event()
        self._last: dict[str, Any] = {}
        self._status: dict[str, Any] = {}
        self._followed = ""  # digest of the mesh whose proxies and demo apps are running
        self._processes = ""
        self._retiring: list[
            EnvoyProcess | DemoApp | Supervised
        ] = []  # removed, stopped once unrouted
        self.credentials: dict[str, WorkloadCert] = {}  # node id -> its current xDS credential

    def say(self, line: str) -> None:
        if self.live and self._recent is not None:
            self._recent.lines.append(f"{time.strftime('%H:%M:%S')} {line.splitlines()[0]}")
            return
        print(f"[{time.strftime('%H:%M:%S')}] {line}", file=self.out, flush=True)

    async def run(self) -> int:
        with self._logging():
            return await self._run_with_signals()

    @contextlib.contextmanager
    def _logging(self) -> Any:
        """On a terminal the live table owns the screen: log records go to a file and the last
        few to the table; otherwise they stay where the caller sent them."""
        if not self.live:
            yield
            return
        root = logging.getLogger()
        saved = root.handlers[:]
        self.log_dir.mkdir(parents=True, exist_ok=True)
        to_file = logging.FileHandler(self.log_dir / "legation.log")
        to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        self._recent = _Recent()
        root.handlers = [to_file, self._recent]
        try:
            yield
        finally:
            root.handlers = saved
            to_file.close()

    async def _run_with_signals(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._stopping.set)
        try:
            return await self._run()
        finally:
            try:
                await self.shutdown()
            finally:
                await self._stop_splice()  # --ebpf: after every child has stopped
                await self._stop_capture()  # --capture: likewise
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)

    async def _run(self) -> int:
        try:
            mesh = load_mesh(self.mesh_path)
            if self.capture:
                mesh = with_capture(mesh, source=str(self.mesh_path))
            plan(
                mesh,
                mesh_path=self.mesh_path,
                reserved={self.status_port: "the control plane's status endpoint (--status-port)"},
            )
            translate(mesh, version="check")
        except LegationError as err:
            self.say(f"invalid mesh, nothing started:\n{err}")
            return 2
        self.mesh = mesh
        self.ca_where = locate_ca(mesh, mesh_dir=self.mesh_path.parent)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        if self.ebpf and not await self._start_splice():
            return 2
        if mesh.capture is not None and not await self._start_capture(mesh):
            return 2
        await self._redirect_pods(mesh)
        code = await self._start_control_plane()
        if code:
            return code
        status = self._status
        pid = self.cp.pid if self.cp else "?"
        self.say(
            f"control plane: xDS on {status['xds']}, status on "
            f"http://127.0.0.1:{self.status_port}/status (pid {pid})"
        )
        code = await self._start_services(status["services"])
        if code:
            return code
        try:
            await self._follow_apps(mesh)
        except OSError as err:
            self.say(f"cannot start a demo app: {err} (is another `legation up` running?)")
            return 1
        try:
            self._access_log_dirs(mesh)
            self._follow_proxies(status)
        except LegationError as err:
            self.say(f"cannot enrol an Envoy: {err}")
            return 1
        self._followed = _digest(self.mesh_path)
        self.say(
            f"started {len(self.apps)} demo apps and {len(self.envoys)} Envoys "
            f"(logs in {self.log_dir})"
        )
        self._write_processes()
        if not await self._wait_ready():
            return 1
        self.banner(mesh)
        return await self._supervise()

    async def _fetch_status(self) -> dict[str, Any] | None:
        """The control plane's /status (kept as the last known one), or None if it does not
        answer."""
        try:
            status = await asyncio.to_thread(_get_json, self.status_port)
        except (OSError, ValueError, urllib.error.URLError):
            return None
        self._status = status
        return status

    async def _wait_ready(self) -> bool:
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline and not self._stopping.is_set():
            dead = self._dead()
            if dead:
                self.say(f"{dead.name} exited during start-up:\n{dead.log_tail()}")
                return False
            status = await self._fetch_status() or {}
            proxies = status.get("proxies", [])
            if proxies and all(p["in_sync"] for p in proxies):
                self.say(f"all {len(proxies)} Envoys ACKed generation {status['generation']}")
                return True
            await self._restart_dead()
            await asyncio.sleep(0.1)
        if self._stopping.is_set():
            return False
        waiting = [p["node_id"] for p in self._status.get("proxies", []) if not p["in_sync"]]
        self.say(f"timed out waiting for Envoys to ACK: {', '.join(waiting)}")
        return False

    def _dead(self) -> EnvoyProcess | None:
        return next((e for e in self.envoys if not e.alive()), None)

    async def _supervise(self) -> int:
        while not self._stopping.is_set():
            self._restart_envoys()
            await self._restart_dead()
            status = await self._fetch_status() if self.cp and self.cp.alive() else None
            if status is not None:
                await self._follow_mesh(status)
                await self._follow_services(status["services"])
                await self._retire(status)
            self._write_processes()
            self.renew_credentials()
            await self._report(status)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), 0.5)
        self.say("stopping")
        return 0

    async def shutdown(self) -> None:
        for envoy in [*self.envoys, *(e for e in self._retiring if isinstance(e, EnvoyProcess))]:
            await asyncio.to_thread(envoy.stop)
        retired = [a for a in self._retiring if not isinstance(a, EnvoyProcess)]
        for app in [*self.apps.values(), *retired]:
            await app.stop()
        await asyncio.gather(*(c.stop() for c in self.services.values()))
        if self.cp is not None:
            await self.cp.stop()


def _get_json(port: int) -> dict[str, Any]:
    # twice a second: without the golden metrics (the access-log service's /metrics, parsed)
    url = f"http://127.0.0.1:{port}/status?golden=0"
    with urllib.request.urlopen(url, timeout=2) as resp:
        doc: dict[str, Any] = json.loads(resp.read())
    return doc
