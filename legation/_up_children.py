"""``legation up``'s own processes: the control plane and each request-path service's workers
(worker i of a service serves ``port + 100 i``), started, followed across reloads (a changed
``workers`` starts or stops workers), restarted one by one with backoff when they die, and listed
for ``legation status`` (role, ``name`` ``kind/i``, ``worker``)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from legation.certs._files import private_dir, write_private
from legation.envoy_process import EnvoyProcess
from legation.errors import LegationError
from legation.supervisor import Backoff, Supervised

# -P: the working directory is not put on the import path (a `legation/` someone planted in the
# directory `legation up` runs from would otherwise run in every child, as root)
LEGATION = [sys.executable, "-P", "-m", "legation.cli"]


class StackChildren:
    """The process-supervising half of :class:`legation.up.Stack` (a mixin over its state)."""

    out: TextIO
    live: bool
    mesh_path: Path
    log_dir: Path
    state_dir: Path
    services_dir: Path
    processes_file: Path
    capture: bool
    status_port: int
    ready_timeout: float
    cp: Supervised | None
    services: dict[str, Supervised]
    envoys: list[EnvoyProcess]
    _envoy_backoff: dict[str, Backoff]
    _stopping: asyncio.Event
    _processes: str

    if TYPE_CHECKING:  # implemented by Stack

        def say(self, line: str) -> None: ...

        async def _fetch_status(self) -> dict[str, Any] | None: ...

    def _child(
        self,
        role: str,
        command: list[str],
        ready_line: str | None = None,
        worker: int | None = None,
        parent_death: str = "TERM",
    ) -> Supervised:
        name = role if worker is None else f"{role}-{worker}"
        return Supervised(
            role=role,
            command=command,
            log_path=self.log_dir / f"{name}.log",
            on_line=self._child_line,
            ready_line=ready_line,
            worker=worker,
            parent_death=parent_death,
        )

    def _worker(self, kind: str, plan: str, worker: int) -> Supervised:
        """Worker ``worker`` of service ``kind``: ``legation serve KIND --plan P --worker I``."""
        return self._child(
            kind,
            [*LEGATION, "serve", kind, "--plan", plan, "--worker", str(worker)],
            ready_line=f"following {plan}",
            worker=worker,
        )

    def _child_line(self, role: str, line: str) -> None:
        if self.live:  # to the log file and the table's recent lines
            logging.getLogger(f"legation.up.{role}").info("%s", line)
        else:
            print(f"[{time.strftime('%H:%M:%S')}] {role}| {line}", file=self.out, flush=True)

    async def _start_control_plane(self) -> int:
        self.cp = self._child(
            "xds",
            [
                *LEGATION,
                "serve",
                "xds",
                "--config",
                str(self.mesh_path),
                "--status-port",
                str(self.status_port),
                "--services-dir",
                str(self.services_dir.resolve()),
                "--processes-file",
                str(self.processes_file.resolve()),
                *(["--capture"] if self.capture else []),
            ],
        )
        await self.cp.start()
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline and not self._stopping.is_set():
            if not self.cp.alive():
                await self.cp.output_done()
                code = self.cp.returncode
                self.say(
                    (
                        "invalid mesh, nothing started"
                        if code == 2
                        else f"the control plane exited (code {code}), nothing started"
                    )
                    + ":\n"
                    + "\n".join(self.cp.tail[-20:])
                )
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
                self.say(f"{kind} service at {info['address']}, not started here (embedded: false)")
                continue
            for worker in range(info.get("workers", 1)):
                child = self._worker(kind, info["plan"], worker)
                self.services[f"{kind}/{worker}"] = await child.start()
        deadline = time.monotonic() + self.ready_timeout
        waiting = {k: declared[k.split("/")[0]] for k in self.services}
        while waiting and time.monotonic() < deadline and not self._stopping.is_set():
            for key, info in list(waiting.items()):
                child = self.services[key]
                if not child.alive():
                    await child.output_done()
                    self.say(
                        "cannot start the mesh's request-path services, nothing started:"
                        "\n" + "\n".join(child.tail[-10:])
                    )
                    return 1
                if child.ready:
                    del waiting[key]
                    if child.worker == info.get("workers", 1) - 1:
                        pids = ", ".join(
                            str(c.pid) for c in self.services.values() if c.role == child.role
                        )
                        self.say(
                            f"{child.role} service at {info['address']}, in its own process"
                            f"es (pids {pids})"
                        )
            await asyncio.sleep(0.05)
        if waiting:
            self.say(f"request-path services not listening in time: {', '.join(waiting)}")
            return 1
        return 0

    async def _follow_services(self, declared: dict[str, Any]) -> None:
        """After a reload: a process for a service the mesh added, none for one it removed (a
        service whose address changed restarts its server inside its own process)."""
        for key, child in list(self.services.items()):
            info = declared.get(child.role, {})
            if "plan" not in info or (child.worker or 0) >= info.get("workers", 1):
                await self.services.pop(key).stop()
                self.say(f"{child.name} gone from the mesh, its process stopped")
        for kind, info in declared.items():
            for worker in range(info.get("workers", 1) if "plan" in info else 0):
                if f"{kind}/{worker}" not in self.services:
                    child = await self._worker(kind, info["plan"], worker).start()
                    self.services[f"{kind}/{worker}"] = child
                    self.say(
                        f"{child.name} added to the mesh, its process started (pid {child.pid})"
                    )

    async def _restart_dead(self) -> None:
        for child in [c for c in (self.cp, *self.services.values()) if c is not None]:
            wait = child.due()
            if wait is None:
                continue
            if child.restart_at is not None and not child.announced:
                child.announced = True
                self.say(
                    f"{child.name} (pid {child.pid}) exited with code {child.returncode}; "
                    f"restarting it in {wait:.1f}s (restart #{child.restarts + 1}); "
                    f"the Envoys keep running"
                )
            if wait == 0:
                child.announced = False
                await child.start()
                self.say(f"{child.name} restarted (pid {child.pid})")
                self._write_processes()

    def _write_processes(self) -> None:
        """The processes file the control plane's /status lists (``processes``)."""
        listed = [{"role": "up", "pid": os.getpid(), "restarts": 0, "alive": True}]
        listed += [c.describe() for c in (self.cp, *self.services.values()) if c is not None]
        listed += [
            {
                "role": "envoy",
                "name": e.name,
                "pid": e.proc.pid if e.proc else None,
                "restarts": b.restarts if (b := self._envoy_backoff.get(e.name)) else 0,
                "alive": e.alive(),
            }
            for e in self.envoys
        ]
        text = json.dumps(listed, indent=1)
        if text == self._processes:
            return
        try:
            private_dir(self.state_dir)
            write_private(self.processes_file, text.encode())
            self._processes = text
        except (OSError, LegationError) as err:
            self.say(f"cannot write {self.processes_file}: {err}")
