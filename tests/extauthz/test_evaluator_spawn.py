"""Starting and reaping a Rego evaluator process, on asyncio's loop and on uvloop alike.

uvloop's own spawn runs every ``os.register_at_fork`` hook (in the service, then in the child
before exec) and resets ignored signals in the child; OpenTelemetry registers such hooks, and
one that blocks keeps the child from exec'ing and the service's loop waiting. The evaluators
are started so that neither happens on either loop (legation/extauthz/_worker.py, ``_Child``).
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest

from legation.extauthz._worker import _Worker, load_line

pytestmark = pytest.mark.either_loop

_LOAD = load_line([("p.rego", "package p\nimport rego.v1\nallow := true\n")], [])
_forks: list[int] = []
os.register_at_fork(before=lambda: _forks.append(os.getpid()))  # runs in the forking process


def _ignored(pid: int) -> set[signal.Signals]:
    status = Path(f"/proc/{pid}/status").read_text()
    mask = int(next(x for x in status.splitlines() if x.startswith("SigIgn:")).split()[1], 16)
    return {s for s in signal.Signals if s.value < 64 and mask >> (s.value - 1) & 1}


def _reaped(pid: int) -> bool:
    """Gone for good: not even a zombie waiting for its parent."""
    return not Path(f"/proc/{pid}").exists()


async def test_spawning_an_evaluator_runs_no_fork_hook_and_it_answers() -> None:
    before = len(_forks)
    worker = await _Worker.spawn(_LOAD, timeout_s=30)
    try:
        assert len(_forks) == before  # no Python ran around the fork in this process
        assert await worker.call("p.allow", b"{}") == ("v", "true")
    finally:
        worker.kill()
        await worker.wait()
    assert _reaped(worker.proc.pid)


async def test_an_evaluator_keeps_the_signals_the_service_ignores() -> None:
    """As under ``nohup legation up``: SIGHUP ignored by the service, and so by its evaluators
    (uvloop's spawn would reset it, and a hang-up would kill them)."""
    old = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        worker = await _Worker.spawn(_LOAD, timeout_s=30)
    finally:
        signal.signal(signal.SIGHUP, old)
    try:
        assert signal.SIGHUP in _ignored(worker.proc.pid)
    finally:
        worker.kill()
        await worker.wait()


async def test_an_evaluator_that_exits_by_itself_is_awaited_and_reaped() -> None:
    """``wait`` returns once the process has exited, whatever ended it, and reaps it; the loop
    serves meanwhile."""
    worker = await _Worker.spawn(_LOAD, timeout_s=30)
    pid = worker.proc.pid
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.005)
            ticks += 1

    ticking = asyncio.ensure_future(tick())
    try:
        waiting = asyncio.ensure_future(worker.wait())
        await asyncio.sleep(0.1)
        assert not waiting.done()  # alive: nothing to reap yet
        os.kill(pid, signal.SIGTERM)  # not through the worker
        await asyncio.wait_for(waiting, 10)
    finally:
        ticking.cancel()
    assert worker.proc.returncode == -signal.SIGTERM
    assert _reaped(pid)
    assert ticks >= 10  # the loop was not blocked while waiting
    worker.kill()  # already reaped: a no-op, never a signal to a reused pid
