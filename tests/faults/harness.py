"""What a fault scenario stands on: a mesh on loopback that it can break and watch recover.

A :class:`Stack` owns everything a scenario starts, and stops it in reverse order: demo apps, the
control plane (in-process on a loop thread, as the integration tests run it, or a ``legation
serve`` child that can be killed), real Envoys bootstrapped for the mesh's proxies with their
enrolment credentials, ``legation serve <service>`` children, ``redis-server``, a TCP proxy that
delays on demand, and the bounded load loop (:mod:`tests.faults.load`). Scenarios live in
:mod:`tests.faults.scenarios`; the tests and ``bench/faults.py`` both run them from there.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from legation.config import load_mesh
from legation.controlplane import ControlPlane
from legation.demo import DemoApp
from legation.envoy_process import EnvoyProcess
from legation.translate.bootstrap import bootstrap
from tests.conftest import distinct_ports
from tests.faults.load import Load, Probe
from tests.loop import LoopThread

T = TypeVar("T")
REPO = Path(__file__).resolve().parents[2]
LEGATION = [sys.executable, "-m", "legation.cli"]


def wait_for(predicate: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"not within {timeout}s: {what}")
        time.sleep(0.02)


def listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples with these labels in a Prometheus text page."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            head, _, value = line.rpartition(" ")
            bare = head.split("{", 1)[0]
            if bare == name and all(f'{k}="{v}"' in head for k, v in labels.items()):
                total += float(value)
    return total


class Child:
    """A child process (a ``legation serve`` service, ``redis-server``) that a scenario kills
    and starts again with the same command; ``port`` is where it is ready."""

    def __init__(self, command: list[str], *, port: int, log: Path, cwd: Path) -> None:
        self.command, self.port, self.log, self.cwd = command, port, log, cwd
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20) -> Child:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                self.command,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.cwd,
                env={**os.environ, "GRPC_VERBOSITY": "ERROR"},
            )
        wait_for(
            lambda: listening(self.port) or self.proc.poll() is not None,  # type: ignore[union-attr]
            timeout,
            f"{self.command[:4]} listening on {self.port}",
        )
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.command} exited:\n{self.log.read_text()[-3000:]}")
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


class DelayProxy:
    """A loopback TCP proxy to ``127.0.0.1:target`` that holds each client chunk ``delay``
    seconds before passing it on (a slow store, real and controllable)."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.delay = 0.0
        self.port = 0
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> DelayProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()

    async def _pipe(
        self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, delayed: bool
    ) -> None:
        try:
            while data := await src.read(65536):
                if delayed and self.delay:
                    await asyncio.sleep(self.delay)
                dst.write(data)
                await dst.drain()
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            dst.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.close()
            return
        for task in (
            asyncio.ensure_future(self._pipe(reader, up_writer, True)),
            asyncio.ensure_future(self._pipe(up_reader, writer, False)),
        ):
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)


class Stack:
    """Everything one scenario runs; :meth:`close` stops it all (also after a failure)."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        tmp.mkdir(parents=True, exist_ok=True)
        self.loop = LoopThread()
        self.cp: ControlPlane | None = None
        self.envoys: dict[str, EnvoyProcess] = {}
        self._closers: list[Callable[[], object]] = [self.loop.close]

    # -- parts -----------------------------------------------------------------------------

    def ports(self, *names: str) -> dict[str, int]:
        return distinct_ports(*names)

    def write(self, name: str, text: str) -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path

    def app(self, name: str, **kwargs: Any) -> DemoApp:
        app = DemoApp(name=name, **kwargs).start_in_thread()
        self._closers.append(app.stop_thread)
        return app

    def run(self, fn: Callable[[], T]) -> T:
        """Call ``fn`` on the control plane's loop thread (its state lives there)."""

        async def call() -> T:
            return fn()

        return self.loop.run(call())

    def control_plane(self, mesh: Path, **kwargs: Any) -> ControlPlane:
        """A ControlPlane (with its embedded services) on the loop thread, started."""
        options: dict[str, Any] = {
            "status_port": 0,
            "poll_interval": 3600,
            "debounce": 0.05,
            "on_event": lambda line: None,
            "ca_dir": self.tmp / "ca",
        }
        cp = ControlPlane(mesh, **{**options, **kwargs})
        self.loop.run(cp.start())
        self._closers.append(lambda: self.loop.run(cp.stop()))
        self.cp = cp
        return cp

    def proxies(self, *, xds_port: int) -> None:
        """A real Envoy per proxy of the in-process control plane's mesh, LIVE and in sync."""
        cp = self.cp
        assert cp is not None and cp.mesh is not None
        for proxy in cp.mesh.proxies():
            config = bootstrap(
                node_id=proxy.node_id,
                node_cluster=proxy.node_cluster,
                xds_port=xds_port,
                admin_port=proxy.admin_port,
                credentials_dir=cp.enrol(proxy.node_id)[1].directory,
            )
            self._envoy(proxy.node_id, config, proxy.admin_port)
        wait_for(
            lambda: all(p["in_sync"] for p in self.run(cp.status)["proxies"]),
            20,
            "every proxy in sync",
        )

    def proxies_by_cli(self, mesh: Path) -> None:
        """A real Envoy per proxy of ``mesh``, bootstrapped and enrolled by ``legation
        bootstrap`` (for a control plane that runs as a child process)."""
        for proxy in load_mesh(mesh).proxies():
            out = subprocess.run(
                [*LEGATION, "bootstrap", "--node", proxy.node_id, "--mesh", str(mesh), "--json"],
                check=True,
                capture_output=True,
                cwd=self.tmp,
            )
            self._envoy(proxy.node_id, json.loads(out.stdout), proxy.admin_port)

    def _envoy(self, name: str, config: dict[str, Any], admin_port: int) -> EnvoyProcess:
        envoy = EnvoyProcess(
            config, admin_port=admin_port, name=name, log_dir=self.tmp / "logs"
        ).start()
        self._closers.append(envoy.stop)
        self.envoys[name] = envoy
        envoy.wait_live()
        return envoy

    def child(self, command: list[str], *, port: int, name: str) -> Child:
        child = Child(command, port=port, log=self.tmp / f"{name}.log", cwd=self.tmp)
        self._closers.append(child.stop)
        return child.start()

    def serve(self, service: str, *, port: int, args: list[str]) -> Child:
        """``legation serve <service>`` as a child process (killable on its own)."""
        return self.child([*LEGATION, "serve", service, *args], port=port, name=f"serve-{service}")

    def redis(self, port: int) -> Child:
        return self.child(
            [
                "redis-server",
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            port=port,
            name="redis",
        )

    def delay_proxy(self, target: int) -> DelayProxy:
        proxy = self.loop.run(DelayProxy(target).start())
        self._closers.append(lambda: self.loop.run(proxy.stop()))
        return proxy

    def load(self, port: int, probes: list[Probe], **kwargs: Any) -> Load:
        load = Load(port, probes, **kwargs)
        self._closers.append(load.kill)
        return load.start()

    # -- observing -------------------------------------------------------------------------

    def metrics(self, status_port: int | None = None) -> str:
        port = status_port or (self.cp.status_port if self.cp else 0)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            return str(resp.read().decode())

    def status(self) -> dict[str, Any]:
        assert self.cp is not None
        return self.run(self.cp.status)

    def close(self) -> None:
        errors = []
        for closer in reversed(self._closers):
            try:
                closer()
            except Exception as err:  # keep stopping the rest
                errors.append(err)
        self._closers.clear()
        if errors:
            raise errors[0]

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
