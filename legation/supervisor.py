"""Legation's own processes under ``legation up``: started, watched, restarted when they die.

A :class:`Supervised` is one child (the control plane, ``legation serve xds``, or a request-path
service, ``legation serve <kind> --plan``): its output goes to a log file and, line by line, to a
callback; it is tied to its parent with ``PR_SET_PDEATHSIG`` (as the Envoys are), so nothing
outlives ``legation up`` even when it is killed. :meth:`Supervised.due` tells the caller when a dead
child should be started again: after a backoff that doubles with each quick death (0.5 s up to
10 s) and starts over once a child has stayed up for a minute.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from legation.envoy_process import tied_to_parent

__all__ = ["Backoff", "Supervised"]

BACKOFF_FIRST = 0.5
BACKOFF_MAX = 10.0
STABLE_AFTER = 60.0


class Backoff:
    """When a dead process should start again: after a delay that doubles with each quick death
    (``BACKOFF_FIRST`` up to ``BACKOFF_MAX``), starting over once it stayed up ``STABLE_AFTER``
    seconds. Used for Legation's own children (:class:`Supervised`) and ``legation up``'s Envoys."""

    def __init__(self, started_at: float = 0.0) -> None:
        self.started_at = started_at
        self.restart_at: float | None = None
        self.restarts = 0
        self.announced = False  # its death has been reported (by the caller)
        self._quick_deaths = 0

    def wait(self, now: float) -> float:
        """For a dead process: seconds until it should be started again (0: now), scheduling
        the restart on the first call after its death."""
        if self.restart_at is None:
            quick = now - self.started_at < STABLE_AFTER
            self._quick_deaths = self._quick_deaths + 1 if quick else 1
            delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (self._quick_deaths - 1))
            self.restart_at = now + delay
        return max(0.0, self.restart_at - now)

    def restarted(self, now: float) -> None:
        self.restarts += 1
        self.started_at, self.restart_at, self.announced = now, None, False


class Supervised(Backoff):
    def __init__(
        self,
        *,
        role: str,
        command: Sequence[str],
        log_path: Path,
        on_line: Callable[[str, str], None],
        env: dict[str, str] | None = None,
        ready_line: str | None = None,
        worker: int | None = None,
        parent_death: str = "TERM",
    ) -> None:
        """``role``: what it is (``xds``, ``extauthz``...); ``on_line(role, line)`` gets each
        line it prints; ``ready_line``: the text of the line that says it serves (``ready``);
        ``worker``: which worker of its service it is (None: the role has one process);
        ``parent_death``: the signal it gets when its parent dies (``KILL`` for a command that
        ignores SIGTERM, such as ``unshare --fork``)."""
        self.role = role
        self.parent_death = parent_death
        self.worker = worker
        self.command = list(command)
        self.log_path = log_path
        self.on_line = on_line
        self.env = env
        self.proc: asyncio.subprocess.Process | None = None
        super().__init__()
        self._reader: asyncio.Task[None] | None = None
        self.tail: list[str] = []
        self.ready_line = ready_line
        self.ready = False

    @property
    def name(self) -> str:
        """``role``, or ``role/worker`` for one worker of a service."""
        return self.role if self.worker is None else f"{self.role}/{self.worker}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode if self.proc is not None else None

    async def start(self) -> Supervised:
        if self.proc is not None:
            self.restarts += 1
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.proc = await asyncio.create_subprocess_exec(
            *tied_to_parent(self.command, self.parent_death),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            process_group=0,
            env={**os.environ, "GRPC_VERBOSITY": "ERROR", **(self.env or {})},
        )
        self.started_at, self.restart_at, self.ready = time.monotonic(), None, False
        self._reader = asyncio.get_running_loop().create_task(self._read(self.proc))
        return self

    async def _read(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        with open(self.log_path, "ab") as log:
            while line := await _line(proc.stdout):
                log.write(line)
                log.flush()
                text = line.decode("utf-8", "replace").rstrip()
                self.tail = [*self.tail[-39:], text]
                if self.ready_line is not None and self.ready_line in text:
                    self.ready = True
                self.on_line(self.role, text)
        await proc.wait()

    def due(self, now: float | None = None) -> float | None:
        """For a dead child: seconds until it should be started again (0: now), scheduling the
        restart on the first call after its death; None while it runs."""
        if self.alive() or self.proc is None:
            return None
        return self.wait(time.monotonic() if now is None else now)

    async def output_done(self, timeout: float = 2.0) -> None:
        """Wait (bounded) until everything the child printed has been read."""
        if self._reader is not None:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(self._reader), timeout)

    async def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM to the child's process group (it leads its own: a wrapper such as ``unshare
        --fork`` ignores SIGTERM, the command under it does not) and to the child's own
        children (a pod app that left the group is PID 1 of its namespace: SIGKILL from here
        ends the namespace), then SIGKILL to them after ``timeout`` seconds. Bounded: an
        escaped descendant still holding the output pipe does not hold the stop."""
        proc = self.proc
        if proc is not None and proc.returncode is None:
            _signal_group(proc, signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), timeout)
            except TimeoutError:
                _signal_group(proc, signal.SIGKILL)
                try:
                    await asyncio.wait_for(proc.wait(), timeout)
                except TimeoutError:  # the pipe still open: stop reading it
                    transport = getattr(proc, "_transport", None)
                    if transport is not None:
                        transport.close()
        await self.output_done()

    def describe(self) -> dict[str, Any]:
        """What ``/status`` lists under ``processes``."""
        described = {
            "role": self.role,
            "pid": self.pid,
            "restarts": self.restarts,
            "alive": self.alive(),
        }
        if self.worker is not None:
            described |= {"name": self.name, "worker": self.worker}
        return described


async def _line(stream: asyncio.StreamReader) -> bytes:
    """The next line; past a line over the stream's limit (64 KiB), which ``readline`` drops
    and raises on, the next piece of output: a child's output never stops the reading (nor a
    ``stop`` waiting for it)."""
    try:
        return await stream.readline()
    except ValueError:
        return await stream.read(65536)


def _signal_group(proc: asyncio.subprocess.Process, sig: signal.Signals) -> None:
    """``sig`` to ``proc``'s process group (``process_group=0`` made it its leader), or to
    ``proc`` alone if that group is gone, and to ``proc``'s own children, which may have left
    the group (``setsid``); nothing once ``proc`` has been reaped (its pid may be reused)."""
    if proc.returncode is not None:
        return
    children = _children(proc.pid)
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
    for child in children:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(child, sig)


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except (OSError, ValueError):
        return []
