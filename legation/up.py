"""``legation up``: the control plane, a real Envoy per proxy, and the demo apps, in one command.

Starts everything the mesh declares (the control plane first, with the request-path services the
mesh embeds: ext_authz, ext_proc, rate limiting; then the demo apps and the Envoys), waits until
every Envoy has ACKed its configuration, prints
where to send requests, then shows a live status (a table on a terminal, log lines otherwise).
Ctrl-C, SIGTERM, or any child dying stops everything; Envoys are also tied to this process with
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
import logging
import signal
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any, TextIO

from legation.certs.enrol import UP_TTL
from legation.certs.workload import WorkloadCert
from legation.config import Mesh, Route
from legation.controlplane import DEFAULT_STATUS_PORT, ControlPlane
from legation.demo import DemoApp
from legation.envoy_process import EnvoyProcess
from legation.errors import LegationError
from legation.services import ServiceStartError, route_chains
from legation.translate.bootstrap import bootstrap

QUICKSTART = Path(__file__).resolve().parent.parent / "examples" / "quickstart" / "mesh.yaml"


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
    ) -> None:
        self.mesh_path = mesh_path
        self.delta = delta
        self.out = out
        self.log_dir = log_dir or Path(".legation") / "logs"
        self.ready_timeout = ready_timeout
        self.live = out.isatty() if live is None else live
        self._recent: _Recent | None = None
        self._banner: list[str] = []
        self.cp = ControlPlane(mesh_path, status_port=status_port, on_event=self.say)
        self.apps: list[DemoApp] = []
        self.envoys: list[EnvoyProcess] = []
        self._stopping = asyncio.Event()
        self._last: dict[str, Any] = {}
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
            await self.cp.start()
        except ServiceStartError as err:
            self.say(f"cannot start the mesh's request-path services, nothing started:\n{err}")
            return 1
        except LegationError as err:
            self.say(f"invalid mesh, nothing started:\n{err}")
            return 2
        except OSError as err:
            self.say(f"cannot start the control plane: {err}")
            return 1
        mesh = self.cp.mesh
        assert mesh is not None
        self.say(f"control plane: xDS on {self.cp.server.address if self.cp.server else '?'}, "
                 f"status on http://127.0.0.1:{self.cp.status_port}/status")
        for kind, info in self.cp.services.status().items():
            where = "in this process" if info["embedded"] else "not started here (embedded: false)"
            self.say(f"{kind} service at {info['address']}, {where}")
        try:
            for spec in mesh.demo_apps():
                app = DemoApp(name=spec.service, version=spec.version, host=spec.host,
                              port=spec.port, fail_every=spec.fail_every, delay_ms=spec.delay_ms)
                await app.start()
                self.apps.append(app)
        except OSError as err:
            self.say(f"cannot start a demo app: {err} (is another `legation up` running?)")
            return 1
        self.log_dir.mkdir(parents=True, exist_ok=True)
        xds = self.cp.server
        assert xds is not None
        for proxy in mesh.proxies():
            try:
                cert, files = self.cp.enrol(proxy.node_id, ttl=UP_TTL)
            except LegationError as err:
                self.say(f"cannot enrol {proxy.node_id}: {err}")
                return 1
            self.credentials[proxy.node_id] = cert
            config = bootstrap(node_id=proxy.node_id, node_cluster=proxy.node_cluster,
                               xds_host=xds.host, xds_port=xds.port,
                               admin_port=proxy.admin_port, delta=self.delta,
                               credentials_dir=files.directory.resolve())
            self.envoys.append(EnvoyProcess(config, admin_port=proxy.admin_port,
                                            name=proxy.node_id, log_dir=self.log_dir).start())
        self.say(f"started {len(self.apps)} demo apps and {len(self.envoys)} Envoys "
                 f"(logs in {self.log_dir})")
        if not await self._wait_ready():
            return 1
        self.banner(mesh)
        return await self._supervise()

    async def _wait_ready(self) -> bool:
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline and not self._stopping.is_set():
            dead = self._dead()
            if dead:
                self.say(f"{dead.name} exited during start-up:\n{dead.log_tail()}")
                return False
            proxies = self.cp.status()["proxies"]
            if proxies and all(p["in_sync"] for p in proxies):
                self.say(f"all {len(proxies)} Envoys ACKed generation {self.cp.generation}")
                return True
            await asyncio.sleep(0.1)
        if self._stopping.is_set():
            return False
        waiting = [p["node_id"] for p in self.cp.status()["proxies"] if not p["in_sync"]]
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
            self.renew_credentials()
            await self._report()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), 1.0)
        self.say("stopping")
        return 0

    def renew_credentials(self) -> list[str]:
        """Re-issue the Envoys' xDS credentials past 2/3 of their lifetime (files rewritten in
        place, the old ones revoked); their node ids."""
        now = self.cp.clock()
        due = [node for node, cert in self.credentials.items() if cert.due(now)]
        for node in due:
            try:
                self.credentials[node] = self.cp.enrol(node, ttl=UP_TTL)[0]
            except LegationError as err:
                self.say(f"cannot renew the xDS credential of {node}: {err}")
        if due:
            self.say(f"xDS credentials renewed for {len(due)} Envoys")
        return due

    async def _report(self) -> None:
        status = self.cp.status()
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

    def _table(self, status: dict[str, Any], counts: dict[str, tuple[int, int]]) -> None:
        rows = [f"Legation  mesh {status['mesh']}  generation {status['generation']}  "
                f"xDS {status['xds']}", ""]
        rows.append(f"{'proxy':28} {'admin':16} {'sync':5} {'CDS':13} {'LDS':13} {'nacks':>5} "
                     f"{'requests':>9} {'5xx':>6}")
        for p in status["proxies"]:
            total, errors = counts.get(p["node_id"], (0, 0))
            rows.append(
                f"{p['node_id']:28} {p['admin']:16} {'yes' if p['in_sync'] else 'NO':5} "
                f"{p['acked'].get('CDS', '-'):13} {p['acked'].get('LDS', '-'):13} "
                f"{p['nacks']:>5} {total:>9} {errors:>6}"
            )
            if p["last_nack"]:
                rows.append(f"    last NACK ({p['last_nack']['type']}): "
                            f"{p['last_nack']['message'][:90]}")
        if status["last_error"]:
            rows += ["", "last rejected mesh change:", *status["last_error"].splitlines()[:6]]
        if self._recent is not None and self._recent.lines:
            rows += ["", f"recent (all of it in {self.log_dir / 'legation.log'}):",
                     *(f"  {line[:110]}" for line in self._recent.lines)]
        self.out.write("\x1b[H\x1b[J" + "\n".join([*self._banner[1:], *rows]) + "\n")
        self.out.flush()

    async def shutdown(self) -> None:
        for envoy in self.envoys:
            await asyncio.to_thread(envoy.stop)
        for app in self.apps:
            await app.stop()
        await self.cp.stop()


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
