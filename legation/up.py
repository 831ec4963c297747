"""``legation up``: the control plane, the request-path services, a real Envoy per proxy, and the
demo apps, in one command.

``legation up`` is a supervisor. The mesh is validated first (an invalid one starts nothing); then
it starts, as child processes of its own, the control plane (``legation serve xds
--services-dir .legation/services``) and one process per request-path service the mesh embeds
(``legation serve <kind> --plan .legation/services/<kind>/plan.json``: ext_authz, ext_proc, rate
limiting), then the demo apps and the Envoys. It waits until every Envoy has ACKed its
configuration, prints where to send requests, then shows a live status (a table on a terminal,
log lines otherwise).

The data path does not depend on the control plane: the services follow the plan the control
plane publishes (a live change is swapped in without a restart) and keep serving their last good
config while it is away. Any Legation process that dies is started again (backoff from 0.5 s to
10 s, each restart logged and counted); the Envoys keep running meanwhile and reconnect to the
control plane by themselves. ``legation status --json`` lists the processes (role, PID, restarts).
A reload that adds proxies starts their Envoys (and demo apps); one that removes proxies stops
theirs. Ctrl-C, SIGTERM, or an Envoy dying stops everything; every child is tied to this process
with PR_SET_PDEATHSIG, so none is orphaned even if this process is killed.

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
import hashlib
import json
import logging
import os
import signal
import sys
import time
import urllib.error
import urllib.request
from collections import deque
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from legation.certs._files import private_dir, write_private
from legation.certs.enrol import UP_TTL, Enrolments, enrol, node_dir_name, xds_root
from legation.certs.issuer import DEFAULT_CA_DIR, CaLocation, locate_ca
from legation.certs.workload import WorkloadCert
from legation.config import Mesh, Route, load_mesh
from legation.controlplane import DEFAULT_STATUS_PORT
from legation.demo import DemoApp
from legation.envoy_process import EnvoyProcess
from legation.errors import LegationError
from legation.services import route_chains
from legation.services.planning import plan
from legation.supervisor import Supervised
from legation.translate import translate
from legation.translate.bootstrap import bootstrap

QUICKSTART = Path(__file__).resolve().parent.parent / "examples" / "quickstart" / "mesh.yaml"
STATE_DIR = DEFAULT_CA_DIR.parent  # .legation
LEGATION = [sys.executable, "-m", "legation.cli"]
log = logging.getLogger("legation.up")


class Stack:
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
    ) -> None:
        self.mesh_path = mesh_path
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
        self.apps: dict[tuple[str, int], DemoApp] = {}
        self.envoys: list[EnvoyProcess] = []
        self._stopping = asyncio.Event()
        self._last: dict[str, Any] = {}
        self._status: dict[str, Any] = {}
        self._followed = ""  # digest of the mesh whose proxies and demo apps are running
        self._processes = ""
        self._retiring: list[EnvoyProcess | DemoApp] = []  # removed, stopped once unrouted
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
            await self.shutdown()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)

    async def _run(self) -> int:
        try:
            mesh = load_mesh(self.mesh_path)
            plan(mesh, mesh_path=self.mesh_path,
                 reserved={self.status_port: "the control plane's status endpoint (--status-port)"})
            translate(mesh, version="check")
        except LegationError as err:
            self.say(f"invalid mesh, nothing started:\n{err}")
            return 2
        self.mesh = mesh
        self.ca_where = locate_ca(mesh, mesh_dir=self.mesh_path.parent)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        code = await self._start_control_plane()
        if code:
            return code
        status = self._status
        pid = self.cp.pid if self.cp else "?"
        self.say(f"control plane: xDS on {status['xds']}, status on "
                 f"http://127.0.0.1:{self.status_port}/status (pid {pid})")
        code = await self._start_services(status["services"])
        if code:
            return code
        try:
            await self._follow_apps(mesh)
        except OSError as err:
            self.say(f"cannot start a demo app: {err} (is another `legation up` running?)")
            return 1
        try:
            self._follow_proxies(status)
        except LegationError as err:
            self.say(f"cannot enrol an Envoy: {err}")
            return 1
        self._followed = _digest(self.mesh_path)
        self.say(f"started {len(self.apps)} demo apps and {len(self.envoys)} Envoys "
                 f"(logs in {self.log_dir})")
        self._write_processes()
        if not await self._wait_ready():
            return 1
        self.banner(mesh)
        return await self._supervise()

    # -- Legation's own processes ----------------------------------------------------------

    def _child(self, role: str, command: list[str], ready_line: str | None = None
               ) -> Supervised:
        return Supervised(role=role, command=command, log_path=self.log_dir / f"{role}.log",
                          on_line=self._child_line, ready_line=ready_line)

    def _child_line(self, role: str, line: str) -> None:
        if self.live:  # to the log file and the table's recent lines
            logging.getLogger(f"legation.up.{role}").info("%s", line)
        else:
            print(f"[{time.strftime('%H:%M:%S')}] {role}| {line}", file=self.out, flush=True)

    async def _start_control_plane(self) -> int:
        self.cp = self._child("xds", [
            *LEGATION, "serve", "xds", "--config", str(self.mesh_path),
            "--status-port", str(self.status_port),
            "--services-dir", str(self.services_dir.resolve()),
            "--processes-file", str(self.processes_file.resolve())])
        await self.cp.start()
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline and not self._stopping.is_set():
            if not self.cp.alive():
                await self.cp.output_done()
                code = self.cp.returncode
                self.say(("invalid mesh, nothing started" if code == 2 else
                          f"the control plane exited (code {code}), nothing started")
                         + ":\n" + "\n".join(self.cp.tail[-20:]))
                return 2 if code == 2 else 1
            status = await self._fetch_status()
            if status is not None:
                return 0
            await asyncio.sleep(0.1)
        self.say("the control plane did not answer on its status port in time")
        return 1

    async def _start_services(self, declared: dict[str, Any]) -> int:
        """A process per service the control plane published; wait until each listens."""
        for kind, info in declared.items():
            if "plan" not in info:
                self.say(f"{kind} service at {info['address']}, not started here "
                         f"(embedded: false)")
                continue
            child = self._child(kind, [*LEGATION, "serve", kind, "--plan", info["plan"]],
                                ready_line=f"following {info['plan']}")
            self.services[kind] = await child.start()
        deadline = time.monotonic() + self.ready_timeout
        waiting = {k: declared[k]["address"] for k in self.services}
        while waiting and time.monotonic() < deadline and not self._stopping.is_set():
            for kind, address in list(waiting.items()):
                child = self.services[kind]
                if not child.alive():
                    await child.output_done()
                    self.say("cannot start the mesh's request-path services, nothing started:"
                             "\n" + "\n".join(child.tail[-10:]))
                    return 1
                if child.ready:
                    self.say(f"{kind} service at {address}, in its own process "
                             f"(pid {child.pid})")
                    del waiting[kind]
            await asyncio.sleep(0.05)
        if waiting:
            self.say(f"request-path services not listening in time: {', '.join(waiting)}")
            return 1
        return 0

    async def _follow_services(self, declared: dict[str, Any]) -> None:
        """After a reload: a process for a service the mesh added, none for one it removed (a
        service whose address changed restarts its server inside its own process)."""
        for kind in [k for k in self.services if "plan" not in declared.get(k, {})]:
            await self.services.pop(kind).stop()
            self.say(f"{kind} service gone from the mesh, its process stopped")
        for kind, info in declared.items():
            if "plan" in info and kind not in self.services:
                child = self._child(kind, [*LEGATION, "serve", kind, "--plan", info["plan"]],
                                    ready_line=f"following {info['plan']}")
                self.services[kind] = await child.start()
                self.say(f"{kind} service added to the mesh, its process started "
                         f"(pid {child.pid})")

    async def _restart_dead(self) -> None:
        for child in [c for c in (self.cp, *self.services.values()) if c is not None]:
            wait = child.due()
            if wait is None:
                continue
            if child.restart_at is not None and not child.announced:
                child.announced = True
                self.say(f"{child.role} (pid {child.pid}) exited with code {child.returncode}; "
                         f"restarting it in {wait:.1f}s (restart #{child.restarts + 1}); "
                         f"the Envoys keep running")
            if wait == 0:
                child.announced = False
                await child.start()
                self.say(f"{child.role} restarted (pid {child.pid})")
                self._write_processes()

    def _write_processes(self) -> None:
        """The processes file the control plane's /status lists (``processes``)."""
        listed = [{"role": "up", "pid": os.getpid(), "restarts": 0, "alive": True}]
        listed += [c.describe() for c in (self.cp, *self.services.values()) if c is not None]
        listed += [{"role": "envoy", "name": e.name, "pid": e.proc.pid if e.proc else None,
                    "restarts": 0, "alive": e.alive()} for e in self.envoys]
        text = json.dumps(listed, indent=1)
        if text == self._processes:
            return
        try:
            private_dir(self.state_dir)
            write_private(self.processes_file, text.encode())
            self._processes = text
        except (OSError, LegationError) as err:
            self.say(f"cannot write {self.processes_file}: {err}")

    async def _fetch_status(self) -> dict[str, Any] | None:
        """The control plane's /status (kept as the last known one), or None if it does not
        answer."""
        try:
            status = await asyncio.to_thread(_get_json, self.status_port)
        except (OSError, ValueError, urllib.error.URLError):
            return None
        self._status = status
        return status

    # -- Envoys and demo apps, following the accepted mesh ------------------------------------

    async def _follow_apps(self, mesh: Mesh) -> None:
        """Start the demo apps ``mesh`` adds; those it removes stop once the Envoys no longer
        route to them (:meth:`_retire`)."""
        wanted = {(a.service, a.port): a for a in mesh.demo_apps()}
        for key in [k for k in self.apps if k not in wanted]:
            self._retiring.append(self.apps.pop(key))
        for key, spec in wanted.items():
            if key not in self.apps:
                app = DemoApp(name=spec.service, version=spec.version, host=spec.host,
                              port=spec.port, fail_every=spec.fail_every, delay_ms=spec.delay_ms)
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
        started = []
        host, _, port = str(status["xds"]).rpartition(":")
        for node, proxy in wanted.items():
            if node in running:
                continue
            cert, directory = self._enrol(node)
            self.credentials[node] = cert
            admin_port = int(proxy["admin"].rpartition(":")[2])
            config = bootstrap(node_id=node, node_cluster=proxy.get("cluster", ""),
                               xds_host=host, xds_port=int(port), admin_port=admin_port,
                               delta=self.delta, credentials_dir=directory.resolve())
            self.envoys.append(EnvoyProcess(config, admin_port=admin_port, name=node,
                                            log_dir=self.log_dir).start())
            started.append(node)
        return started, stopped

    def _enrol(self, node: str) -> tuple[WorkloadCert, Path]:
        """A new xDS credential for ``node`` (its earlier one revoked), written to its files."""
        assert self.ca_where is not None
        where = self.ca_where
        directory = where.nodes_dir / node_dir_name(node)
        cert, _ = enrol(xds_root(where.home), Enrolments.beside(where.home), node, directory,
                        ttl=UP_TTL)
        return cert, directory

    async def _follow_mesh(self, status: dict[str, Any]) -> None:
        """After a reload: the Envoys and demo apps of the proxies the served mesh has."""
        digest = _digest(self.mesh_path)
        if digest == self._followed or digest != status.get("mesh_digest"):
            return  # nothing new, or the file on disk is not the mesh being served
        try:
            mesh = load_mesh(self.mesh_path)
            await self._follow_apps(mesh)
            started, stopped = self._follow_proxies(status)
        except (LegationError, OSError) as err:
            self.say(f"cannot follow the reloaded mesh's proxies: {err}")
            return
        self.mesh, self._followed = mesh, digest
        if started:
            self.say(f"new proxies in the mesh, their Envoys started: {', '.join(started)}")
        if stopped:
            self.say(f"proxies gone from the mesh, their Envoys stop once the others are in "
                     f"sync: {', '.join(stopped)}")

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

    def banner(self, mesh: Mesh) -> None:
        lines = ["", "Legation is up. Try:"]
        gw = mesh.gateway
        if gw is not None:
            base = f"http://{gw.host}:{gw.port}"
            chains = route_chains(mesh).chains  # the plan's chains, as the service runs them
            for route in mesh.routes:
                if not route.on_gateway:
                    continue
                path = route.match.path.exact or route.match.path.prefix
                chain = chains.get(route.name)
                computed = {h for f in (chain.filters if chain else ())
                            for h in getattr(f, "computes", ())}
                if path is None or any(h.name.lower() in computed for h in route.match.headers):
                    continue  # a header its own filter computes: a client cannot pick it
                headers = " ".join(f"-H '{h.name}: {h.exact}'" for h in route.match.headers
                                   if h.exact is not None and not h.invert)
                lines.append(f"  curl -s {base}{path} {headers}".rstrip()
                             + f"    # route {route.name}{_asks(route)}")
        lines += ["", "  legation status            # proxies, ACKed versions, NACKs",
                  f"  edit {self.mesh_path} and save: the change is validated and pushed live",
                  "  Ctrl-C stops everything", ""]
        self._banner = lines
        print("\n".join(lines), file=self.out, flush=True)

    async def _supervise(self) -> int:
        while not self._stopping.is_set():
            dead = self._dead()
            if dead is not None:
                self.say(f"{dead.name} exited (code {dead.proc.returncode if dead.proc else '?'})"
                         f"; stopping everything. Its log:\n{dead.log_tail(20)}")
                return 1
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

    async def _report(self, status: dict[str, Any] | None) -> None:
        if status is None:
            if self.live:
                self._table(self._status or {}, {}, away=True)
            return
        counts = await asyncio.gather(*(asyncio.to_thread(_requests, e) for e in self.envoys))
        by_node = dict(zip((e.name for e in self.envoys), counts, strict=True))
        if self.live:
            self._table(status, by_node)
            return
        for p in status["proxies"]:
            key = p["node_id"]
            now = (p["in_sync"], p["nacks"])
            if self._last.get(key) != now:
                if p["last_nack"] and p["nacks"] != (self._last.get(key) or (0, 0))[1]:
                    n = p["last_nack"]
                    self.say(f"{key} rejected {n['type']} {n['version']}: {n['message']}")
                elif p["in_sync"]:
                    self.say(f"{key} in sync with generation {status['generation']}")
                self._last[key] = now

    def _table(self, status: dict[str, Any], counts: dict[str, tuple[int, int]], *,
               away: bool = False) -> None:
        rows = [f"Legation  mesh {status.get('mesh', '?')}  generation "
                f"{status.get('generation', '?')}  xDS {status.get('xds', '?')}"
                + ("  (control plane restarting; the data path keeps serving)" if away else ""),
                ""]
        rows.append(f"{'proxy':28} {'admin':16} {'sync':5} {'CDS':13} {'LDS':13} {'nacks':>5} "
                     f"{'requests':>9} {'5xx':>6}")
        for p in status.get("proxies", []):
            total, errors = counts.get(p["node_id"], (0, 0))
            rows.append(
                f"{p['node_id']:28} {p['admin']:16} {'yes' if p['in_sync'] else 'NO':5} "
                f"{p['acked'].get('CDS', '-'):13} {p['acked'].get('LDS', '-'):13} "
                f"{p['nacks']:>5} {total:>9} {errors:>6}"
            )
            if p["last_nack"]:
                rows.append(f"    last NACK ({p['last_nack']['type']}): "
                            f"{p['last_nack']['message'][:90]}")
        if status.get("last_error"):
            rows += ["", "last rejected mesh change:", *status["last_error"].splitlines()[:6]]
        if self._recent is not None and self._recent.lines:
            rows += ["", f"recent (all of it in {self.log_dir / 'legation.log'}):",
                     *(f"  {line[:110]}" for line in self._recent.lines)]
        self.out.write("\x1b[H\x1b[J" + "\n".join([*self._banner[1:], *rows]) + "\n")
        self.out.flush()

    async def shutdown(self) -> None:
        for envoy in [*self.envoys, *(e for e in self._retiring if isinstance(e, EnvoyProcess))]:
            await asyncio.to_thread(envoy.stop)
        for app in [*self.apps.values(), *(a for a in self._retiring if isinstance(a, DemoApp))]:
            await app.stop()
        await asyncio.gather(*(c.stop() for c in self.services.values()))
        if self.cp is not None:
            await self.cp.stop()


def _digest(path: Path) -> str:
    """The mesh file's digest as the control plane reports it (``mesh_digest``)."""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()[:8]
    except OSError:
        return ""


def _get_json(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=2) as resp:
        doc: dict[str, Any] = json.loads(resp.read())
    return doc


def _asks(route: Route) -> str:
    """What a route asks of the request-path services, for the banner."""
    parts = []
    if route.authz is not None and route.authz != "disabled":
        parts.append(f"policy {route.authz}")
    if route.filters:
        parts.append("filters " + ", ".join(f.name for f in route.filters))
    if route.rate_limits:
        keys = [a.request_headers.header for d in route.rate_limits for a in d.actions
                if a.request_headers is not None]
        parts.append("rate limited" + (f" per {', '.join(keys)}" if keys else ""))
    return f" ({'; '.join(parts)})" if parts else ""


def _requests(envoy: EnvoyProcess) -> tuple[int, int]:
    """Downstream requests and 5xx answered by the Envoy's HTTP listeners."""
    try:
        stats = envoy.stats(r"^http\..*downstream_rq_(completed|5xx)$")
    except (OSError, ValueError):
        return (0, 0)
    total = sum(v for k, v in stats.items() if k.endswith("downstream_rq_completed")
                and not k.startswith("http.admin"))
    errors = sum(v for k, v in stats.items() if k.endswith("downstream_rq_5xx")
                 and not k.startswith("http.admin"))
    return total, errors


class _Recent(logging.Handler):
    """The last few log lines, for the live table."""

    def __init__(self, keep: int = 6) -> None:
        super().__init__(level=logging.INFO)
        self.lines: deque[str] = deque(maxlen=keep)

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{time.strftime('%H:%M:%S')} {record.levelname.lower()} "
                          f"{record.getMessage().splitlines()[0]}")
