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
from legation.supervisor import _children

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


async def test_an_idle_evaluator_that_dies_is_reaped_at_once() -> None:
    """Nobody waits for it, yet it leaves no zombie behind (the loop watches its pidfd)."""
    worker = await _Worker.spawn(_LOAD, timeout_s=30)
    pid = worker.proc.pid
    os.kill(pid, signal.SIGKILL)
    for _ in range(200):
        if _reaped(pid):
            break
        await asyncio.sleep(0.01)
    assert _reaped(pid)
    assert worker.proc.returncode == -signal.SIGKILL
    await asyncio.wait_for(worker.wait(), 5)  # and a later wait returns at once


def _fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


async def test_a_spawn_that_fails_closes_each_pipe_end_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Popen failing (no memory, no processes left) closes the four pipe ends exactly once: a
    second close could close a descriptor another thread had just been given."""
    import subprocess

    from legation.extauthz import _worker

    closed: list[int] = []
    real_close = os.close

    def close(fd: int) -> None:
        closed.append(fd)
        real_close(fd)

    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError(11, "Resource temporarily unavailable")

    before = _fds()
    monkeypatch.setattr(_worker.os, "close", close)
    monkeypatch.setattr(_worker.subprocess, "Popen", refuse)
    with pytest.raises(OSError):
        await _Worker.spawn(_LOAD, timeout_s=30)
    monkeypatch.setattr(_worker.subprocess, "Popen", subprocess.Popen)
    assert len(closed) == 4 and len(set(closed)) == 4, closed
    assert _fds() == before


async def test_a_replacement_loaded_after_its_pool_closed_is_stopped_and_reaped() -> None:
    """A policy reload retires a pool with a grace period; an evaluator that finishes loading
    during it (replacing one killed at its deadline) is stopped and awaited, not dropped: no
    process and no pipe is left once ``close`` returns."""
    from legation.extauthz.evaluator import EvaluatorPool

    before = _fds()
    pool = await EvaluatorPool([("p.rego", "package p\nallow := true\n")], [], size=2).start()
    first = await pool._idle.get()
    busy = await pool._idle.get()  # an evaluation still in flight keeps the grace going
    pids = {first.proc.pid, busy.proc.pid}
    pool._replace(first)  # as evaluate() does when a call reaches its deadline
    while first in pool._dying:
        await asyncio.sleep(0.005)
    closing = asyncio.ensure_future(pool.close(grace_s=10))
    for _ in range(400):  # the replacement loads meanwhile, and finds the pool closed
        if not pool._spawning:
            break
        await asyncio.sleep(0.025)
    assert not pool._spawning
    pool._idle.put_nowait(busy)  # the evaluation ends: the grace ends
    await asyncio.wait_for(closing, 15)
    assert all(_reaped(pid) for pid in pids)
    assert _children(os.getpid()) == []  # the loop's thread (this one) started them all
    assert _fds() == before


async def test_without_pidfds_an_evaluator_is_still_killed_awaited_and_reaped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Kernels before 5.3 have no pidfd: a thread waits instead."""

    def unsupported(pid: int, flags: int = 0) -> int:
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(os, "pidfd_open", unsupported)
    worker = await _Worker.spawn(_LOAD, timeout_s=30)
    try:
        assert await worker.call("p.allow", b"{}") == ("v", "true")
    finally:
        worker.kill()
        await asyncio.wait_for(worker.wait(), 10)
    assert worker.proc.returncode == -signal.SIGKILL
    assert _reaped(worker.proc.pid)


async def test_a_cancelled_wait_closes_the_pipes_and_the_watch_reaps_later() -> None:
    """``close()`` of a pool may cancel a wait for a killed evaluator (its grace over): the
    pipes are closed all the same, and the process is reaped when it exits."""
    before = _fds()
    worker = await _Worker.spawn(_LOAD, timeout_s=30)
    pid = worker.proc.pid
    waiting = asyncio.ensure_future(worker.wait())
    await asyncio.sleep(0.05)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert worker._to == -1 and worker._from == -1  # the pipes: closed by the cancelled wait
    worker.kill()
    for _ in range(200):
        if _reaped(pid) and _fds() == before:
            break
        await asyncio.sleep(0.01)
    assert _reaped(pid)
    assert _fds() == before  # the pidfd too, once the watch saw the exit


async def test_kill_falls_back_to_the_pid_when_pidfd_signals_are_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A seccomp profile may allow pidfd_open but not pidfd_send_signal."""

    def refused(pidfd: int, sig: int, *args: object) -> None:
        raise PermissionError(1, "Operation not permitted")

    worker = await _Worker.spawn(_LOAD, timeout_s=30)
    monkeypatch.setattr(signal, "pidfd_send_signal", refused)
    worker.kill()
    await asyncio.wait_for(worker.wait(), 10)
    assert worker.proc.returncode == -signal.SIGKILL
    assert _reaped(worker.proc.pid)


def test_an_evaluator_started_on_one_loop_can_be_awaited_from_another() -> None:
    first = asyncio.new_event_loop()
    try:
        worker = first.run_until_complete(_Worker.spawn(_LOAD, timeout_s=30))

        async def stop() -> None:
            worker.kill()
            await asyncio.wait_for(worker.wait(), 10)

        asyncio.run(stop())  # another loop: a thread waits (the watch belongs to the first)
        assert worker.proc.returncode == -signal.SIGKILL
        assert _reaped(worker.proc.pid)
    finally:
        first.close()
