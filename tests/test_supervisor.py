"""`legation up`'s children (legation.supervisor): output forwarded line by line and logged, the
ready line noticed, a dead child's restart scheduled with a doubling backoff, counted."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from legation.supervisor import BACKOFF_FIRST, BACKOFF_MAX, Supervised


async def test_a_dead_child_is_restarted_with_backoff(tmp_path: Path) -> None:
    lines: list[tuple[str, str]] = []
    child = Supervised(
        role="demo",
        log_path=tmp_path / "demo.log",
        command=[sys.executable, "-c", "print('serving on 1', flush=True)"],
        on_line=lambda role, line: lines.append((role, line)),
        ready_line="serving on",
    )
    assert child.due() is None  # never started: nothing to restart
    await child.start()
    assert child.proc is not None
    await child.proc.wait()
    await child.output_done()
    assert lines == [("demo", "serving on 1")] and child.ready
    assert (tmp_path / "demo.log").read_text() == "serving on 1\n"
    assert child.describe() == {"role": "demo", "pid": child.pid, "restarts": 0, "alive": False}

    now = child.started_at + 1.0  # it died quickly
    assert child.due(now) == BACKOFF_FIRST
    assert child.due(now + BACKOFF_FIRST) == 0  # scheduled once, then due
    await child.start()
    assert child.restarts == 1 and not child.ready  # ready again only when it says so
    await child.proc.wait()
    await child.output_done()
    assert child.due(child.started_at + 1.0) == 2 * BACKOFF_FIRST  # another quick death
    child.restart_at, child.started_at = None, child.started_at - 3600  # it had run an hour
    assert child.due(child.started_at + 3600) == BACKOFF_FIRST  # stable: backoff starts over
    for _ in range(20):
        child.restart_at = None
        child.started_at = 0.0
        assert child.due(1.0) <= BACKOFF_MAX


async def test_stop_terminates_a_running_child(tmp_path: Path) -> None:
    child = Supervised(
        role="sleeper",
        log_path=tmp_path / "s.log",
        on_line=lambda *_: None,
        command=[sys.executable, "-c", "import time; time.sleep(30)"],
    )
    await child.start()
    assert child.alive()
    await child.stop(timeout=5)
    assert not child.alive() and child.returncode is not None


def test_children_never_import_a_legation_planted_in_the_working_directory(
    tmp_path: Path,
) -> None:
    """`legation up` runs its children as root from whatever directory it was started in;
    ``python -m`` would put that directory first on the import path (attacker review)."""
    import subprocess

    from legation._up_children import LEGATION
    from legation.extauthz._worker import _CMD

    planted = tmp_path / "legation"
    planted.mkdir()
    marker = tmp_path / "planted-ran"
    (planted / "__init__.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    (planted / "cli.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    done = subprocess.run(
        [*LEGATION, "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and "legation" in done.stdout
    assert not marker.exists()
    assert _CMD[1] == "-P"


_AFTER_A_SPAN = """
import asyncio, sys, tempfile
from pathlib import Path

from legation.tracing import spans

# what recording the first span does: a provider for the service (legation.tracing.spans), made
# before the thread pool module was first imported, so OpenTelemetry's at-fork handler runs
# before that module's own and finds its lock held (the parent took it for the fork)
spans._EXPORT.set(("127.0.0.1", 9))
assert spans._EXPORT.tracer("extauthz") is not None
import concurrent.futures.thread  # noqa: E402

from legation.envoy_process import EnvoyProcess  # noqa: E402
from legation.supervisor import Supervised  # noqa: E402


async def main() -> None:
    child = Supervised(
        role="demo",
        log_path=Path(tempfile.mkdtemp()) / "demo.log",
        command=[sys.executable, "-c", "print('up', flush=True)"],
        on_line=lambda role, line: print(role, line, flush=True),
    )
    await child.start()
    await child.proc.wait()
    await child.output_done()


asyncio.run(main())
envoy = EnvoyProcess({}, admin_port=1, log_dir=Path(tempfile.mkdtemp())).start()
envoy.stop()
print("envoy started", flush=True)
"""


def test_children_start_after_a_span_was_recorded() -> None:
    """A ``preexec_fn`` makes Python run every at-fork handler in the child before exec; once
    OpenTelemetry's TracerProvider existed, a child could hang there, and the parent with it (a
    test run hung so). Legation's children are started without one."""
    import subprocess

    done = subprocess.run(
        [sys.executable, "-c", _AFTER_A_SPAN], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["demo up", "envoy started"]


async def test_a_child_dies_with_the_thread_that_started_it(tmp_path: Path) -> None:
    """The parent-death signal survives the change from a ``preexec_fn`` to ``setpriv``."""
    child = Supervised(
        role="probe",
        log_path=tmp_path / "p.log",
        on_line=lambda *_: None,
        command=[sys.executable, "-c", _PDEATHSIG_PROBE],
    )
    await child.start()
    assert child.proc is not None
    await child.proc.wait()
    await child.output_done()
    assert (tmp_path / "p.log").read_text().strip() == str(int(signal.SIGTERM))
    assert child.pid is not None


_PDEATHSIG_PROBE = (
    "import ctypes\n"
    "sig = ctypes.c_int()\n"
    "ctypes.CDLL(None).prctl(2, ctypes.byref(sig))  # PR_GET_PDEATHSIG\n"
    "print(sig.value, flush=True)"
)


def test_without_a_setpriv_that_takes_pdeathsig_children_are_still_tied(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """util-linux before 2.33 and BusyBox have a setpriv without ``--pdeathsig`` (attacker
    review: every child then failed to start); a Python step sets the signal instead."""
    import subprocess

    from legation import envoy_process

    old = tmp_path / "bin" / "setpriv"
    old.parent.mkdir()
    old.write_text("#!/bin/sh\necho \"setpriv: unrecognized option '$1'\" >&2\nexit 1\n")
    old.chmod(0o755)
    monkeypatch.setenv("PATH", f"{old.parent}:{os.environ['PATH']}")
    envoy_process.setpriv_with_pdeathsig.cache_clear()
    try:
        command = envoy_process.tied_to_parent([sys.executable, "-c", _PDEATHSIG_PROBE])
        assert command[0] == sys.executable  # not the old setpriv
        done = subprocess.run(command, capture_output=True, text=True, timeout=30)
    finally:
        envoy_process.setpriv_with_pdeathsig.cache_clear()
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(int(signal.SIGTERM))


@pytest.mark.skipif(os.geteuid() != 0, reason="setpriv --reuid needs root")
def test_a_pod_app_keeps_the_parent_death_signal_after_its_uid_changes() -> None:
    """The kernel clears the signal when the uid changes, so the app's own setpriv sets it again
    (attacker review: pod apps outlived a killed `legation up`)."""
    import subprocess

    from legation.capture.pods import unprivileged

    done = subprocess.run(
        [*unprivileged(65534), sys.executable, "-I", "-c", _PDEATHSIG_PROBE],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(int(signal.SIGTERM))


_TERM_AWARE = (
    "import signal, sys, time\n"
    "def bye(*_):\n"
    "    print('got TERM', flush=True)\n"
    "    sys.exit(0)\n"
    "signal.signal(signal.SIGTERM, bye)\n"
    "print('ready', flush=True)\n"
    "time.sleep(60)\n"
)


async def _ready_pod_app(
    tmp_path: Path, code: str, on_line: Callable[[str], object], user: Sequence[str] = ()
) -> Supervised:
    """``code`` run as a pod's app is (its own PID namespace, then ``user``: a setpriv prefix),
    started and ready."""
    from legation.capture.pods import own_pid_namespace

    child = Supervised(
        role="pod-app",
        log_path=tmp_path / "app.log",
        on_line=lambda role, line: on_line(line),
        command=[*own_pid_namespace(), *user, sys.executable, "-I", "-c", code],
        ready_line="ready",
        parent_death="KILL",
    )
    await child.start()
    for _ in range(200):
        if child.ready:
            break
        await asyncio.sleep(0.05)
    assert child.ready
    return child


@pytest.mark.skipif(os.geteuid() != 0, reason="unshare --pid needs root")
async def test_stop_reaches_a_command_under_a_wrapper_that_ignores_sigterm(tmp_path: Path) -> None:
    """A pod's app runs under ``unshare --fork``, which ignores SIGTERM: the stop signals the
    child's process group, so the app itself gets SIGTERM and ends on its own."""
    lines: list[str] = []
    child = await _ready_pod_app(tmp_path, _TERM_AWARE, lines.append)
    await child.stop(timeout=30)
    assert "got TERM" in lines  # not the SIGKILL after the timeout
    assert child.returncode == 0


_PARENT_OF_A_POD_APP = """
import asyncio, sys, tempfile, time
from pathlib import Path
from legation.capture.pods import own_pid_namespace, unprivileged
from legation.supervisor import Supervised

# no SIGTERM handler: as PID 1 of its namespace it drops a TERM
SLEEPER = "import time; print('ready', flush=True); time.sleep(60)"


async def main():
    child = Supervised(
        role="pod-app",
        log_path=Path(tempfile.mkdtemp()) / "a.log",
        on_line=lambda role, line: None,
        command=[
            *own_pid_namespace(),
            *unprivileged(65534, pdeathsig="KILL"),  # as app_command runs it
            sys.executable,
            "-I",
            "-c",
            SLEEPER,
        ],
        ready_line="ready",
        parent_death="KILL",
    )
    await child.start()
    while not child.ready:
        await asyncio.sleep(0.05)
    app = Path(f"/proc/{child.pid}/task/{child.pid}/children").read_text().split()
    print(child.pid, *app, flush=True)
    await asyncio.sleep(60)

asyncio.run(main())
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="unshare --pid needs root")
def test_a_pod_app_dies_with_a_killed_parent() -> None:
    """``unshare --fork`` ignores SIGTERM, so a pod app is tied with SIGKILL: a ``legation up``
    killed outright leaves no app behind (attacker review of the PID namespace)."""
    import subprocess
    import time

    parent = subprocess.Popen(
        [sys.executable, "-c", _PARENT_OF_A_POD_APP], stdout=subprocess.PIPE, text=True
    )
    try:
        assert parent.stdout is not None
        pids = [int(p) for p in parent.stdout.readline().split()]
        assert len(pids) == 2  # unshare and the app under it
        assert all(Path(f"/proc/{p}").exists() for p in pids)
    finally:
        parent.kill()
        parent.wait()
        if parent.stdout is not None:
            parent.stdout.close()
    deadline = time.monotonic() + 20
    while any(Path(f"/proc/{p}").exists() for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(Path(f"/proc/{p}").exists() for p in pids)


_ESCAPES = (
    "import ctypes, os, signal, time\n"
    "os.setsid()  # out of the process group stop() signals\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "ctypes.CDLL(None).prctl(1, 0)  # no parent-death signal\n"
    "print('ready', flush=True)\n"
    "time.sleep(120)\n"
)


@pytest.mark.skipif(os.geteuid() != 0, reason="unshare --pid needs root")
async def test_a_pod_app_that_leaves_its_group_is_still_stopped(tmp_path: Path) -> None:
    """An app may leave its process group, ignore SIGTERM and clear its parent-death signal
    (attacker review: it outlived the stop, and the stop never returned, its output pipe held
    open). Its stop also signals the child's children: SIGKILL to PID 1 ends the namespace."""
    from legation.capture.pods import unprivileged

    child = await _ready_pod_app(
        tmp_path, _ESCAPES, lambda line: None, unprivileged(65534, pdeathsig="KILL")
    )
    assert child.pid is not None
    app = Path(f"/proc/{child.pid}/task/{child.pid}/children").read_text().split()
    assert len(app) == 1
    await asyncio.wait_for(child.stop(timeout=1), 60)  # fails, never hangs, if it holds
    assert child.returncode is not None
    for _ in range(200):
        if not Path(f"/proc/{app[0]}").exists():
            break
        await asyncio.sleep(0.05)
    assert not Path(f"/proc/{app[0]}").exists()


async def test_a_line_over_the_limit_does_not_stop_the_reading(tmp_path: Path) -> None:
    """A child printing a line over 64 KiB made the reader raise, and the stop with it (attacker
    review: a pod app could abort ``legation up``'s shutdown so)."""
    lines: list[str] = []
    child = Supervised(
        role="long",
        log_path=tmp_path / "l.log",
        on_line=lambda role, line: lines.append(line),
        command=[sys.executable, "-c", "print('x' * 200_000); print('after', flush=True)"],
    )
    await child.start()
    assert child.proc is not None
    await child.proc.wait()
    await child.stop()
    assert lines[-1] == "after"
