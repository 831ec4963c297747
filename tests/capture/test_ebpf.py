"""``--ebpf`` on the real kernel: the sockops + sk_msg splice attached to Legation's own cgroup v2.

Skipped (with the missing things named) only where root or a kernel feature is missing. Every test
removes what it made in a ``finally`` (and an atexit hook catches an interrupted run).
"""

from __future__ import annotations

import atexit
import itertools
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import legation
from legation.capture.ebpf import Sockmap, build_object, missing_features
from legation.capture.ebpf._build import SOURCE
from legation.capture.ebpf._kernel import bpftool
from legation.capture.errors import CaptureError

ECHO = Path(__file__).with_name("ebpf_echo.py")
MISSING = missing_features()
needs_ebpf = pytest.mark.skipif(bool(MISSING), reason=f"--ebpf needs: {'; '.join(MISSING)}")
_names = itertools.count()


def _name() -> str:
    return f"t{os.getpid()}-{next(_names)}"


@pytest.fixture
def sockmap() -> Iterator[Sockmap]:
    splice = Sockmap(name=_name())
    atexit.register(splice.stop)
    try:
        yield splice.start()
    finally:
        splice.stop()
        atexit.unregister(splice.stop)


def _pair(
    serve: list[str], talk: list[str], preexec: Any = None, client_preexec: Any = "same"
) -> tuple[str, str]:
    """A server process (``ebpf_echo.py SERVE...``, which prints its port first) and a client
    process (``ebpf_echo.py TALK...``, ``PORT`` replaced), each started with its preexec_fn (the
    client's is the server's unless given); what each printed after that."""
    client_preexec = preexec if client_preexec == "same" else client_preexec
    with subprocess.Popen(
        [sys.executable, str(ECHO), *serve], stdout=subprocess.PIPE, text=True, preexec_fn=preexec
    ) as server:
        try:
            assert server.stdout is not None
            port = server.stdout.readline().strip()
            client = subprocess.run(
                [sys.executable, str(ECHO), *(port if a == "PORT" else a for a in talk)],
                capture_output=True, text=True, timeout=60, check=True, preexec_fn=client_preexec,
            )  # fmt: skip
            said = server.stdout.read()
            assert server.wait(timeout=20) == 0
            return said, client.stdout
        finally:
            server.kill()


def _echo(count: int, preexec: Any = None, client_preexec: Any = "same") -> int:
    """``count`` round trips of 1 B to 64 KiB, both ways; the bytes echoed."""
    return int(_pair(["serve"], ["talk", "PORT", str(count)], preexec, client_preexec)[1])


def _expected(count: int) -> int:
    return sum(1 + (index * 7919) % (64 * 1024) for index in range(count))


def programs_gone(ids: set[int], timeout: float = 10.0) -> bool:
    """Whether no program with one of ``ids`` is loaded, waiting up to ``timeout``: the kernel
    frees a program whose last holder was a map from a work queue, after an RCU grace period."""
    deadline = time.monotonic() + timeout
    while ids & {p["id"] for p in bpftool("prog", "show", parse=True) or []}:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _attached_ids(tree: list[dict[str, object]]) -> dict[str, set[int]]:
    return {
        str(entry["cgroup"]): {int(p["id"]) for p in entry["programs"]}  # type: ignore[attr-defined]
        for entry in tree
    }


@needs_ebpf
def test_sockops_is_attached_to_legations_cgroup_and_nowhere_else(sockmap: Sockmap) -> None:
    ids = sockmap.program_ids()
    shown = bpftool("cgroup", "show", str(sockmap.cgroup), parse=True)
    assert [(p["id"], p["attach_type"]) for p in shown] == [
        (ids["legation_sockops"], "cgroup_sock_ops")
    ]
    root = bpftool("cgroup", "show", str(sockmap.cgroup_root), parse=True) or []
    assert ids["legation_sockops"] not in {p["id"] for p in root}
    holders = {
        cgroup
        for cgroup, attached in _attached_ids(bpftool("cgroup", "tree", parse=True) or []).items()
        if set(ids.values()) & attached
    }
    assert holders == {str(sockmap.cgroup)}
    assert sockmap.cgroup.parent == sockmap.cgroup_root


@needs_ebpf
def test_traffic_between_two_processes_in_the_cgroup_is_spliced_and_intact(
    sockmap: Sockmap,
) -> None:
    before = sockmap.stats()
    assert _echo(200, sockmap.preexec()) == _expected(200)
    after = sockmap.stats()
    assert after["recorded"] - before["recorded"] >= 2  # both ends of the connection
    # the greeting, 200 messages one way and 200 echoes the other, all through the sk_msg program
    assert after["spliced"] - before["spliced"] >= 401


@needs_ebpf
def test_bytes_sent_the_moment_a_connection_opens_stay_in_order(sockmap: Sockmap) -> None:
    before = sockmap.stats()
    assert _pair(["sink", "20"], ["burst", "PORT", "20", "300"], sockmap.preexec())[0] == "20\n"
    after = sockmap.stats()
    assert after["spliced"] + after["passed"] - before["spliced"] - before["passed"] >= 20 * 300


@needs_ebpf
def test_processes_outside_the_cgroup_are_unaffected(sockmap: Sockmap) -> None:
    before = sockmap.stats()
    assert _echo(100) == _expected(100)
    assert sockmap.stats() == before


@needs_ebpf
def test_a_process_in_the_cgroup_talking_to_one_outside_goes_the_normal_way(
    sockmap: Sockmap,
) -> None:
    before = sockmap.stats()
    assert _echo(50, None, sockmap.preexec()) == _expected(50)  # only the client is inside
    after = sockmap.stats()
    assert after["recorded"] - before["recorded"] == 1
    assert after["spliced"] == before["spliced"]
    assert after["passed"] - before["passed"] >= 50


@needs_ebpf
def test_stop_leaves_nothing_and_moves_processes_out() -> None:
    splice = Sockmap(name=_name())
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        splice.start()
        ids = set(splice.program_ids().values())
        splice.join(sleeper.pid)
        assert str(sleeper.pid) in (splice.cgroup / "cgroup.procs").read_text().split()
        splice.stop()
        assert not splice.cgroup.exists() and not splice.pins.exists()
        assert sleeper.poll() is None  # moved out, not killed
        assert f"legation-{splice.name}" not in Path(f"/proc/{sleeper.pid}/cgroup").read_text()
        assert programs_gone(ids)
        tree = _attached_ids(bpftool("cgroup", "tree", parse=True) or [])
        assert not any(ids & attached for attached in tree.values())
        assert str(splice.cgroup) not in tree
    finally:
        splice.stop()
        sleeper.kill()
        sleeper.wait()


@needs_ebpf
def test_a_start_removes_what_a_crashed_run_left(caplog: pytest.LogCaptureFixture) -> None:
    name = _name()
    crash = (
        "import os, sys; from legation.capture.ebpf import Sockmap\n"
        "Sockmap(name=sys.argv[1]).start(); os._exit(9)"
    )
    assert (
        subprocess.run([sys.executable, "-c", crash, name], timeout=60, check=False).returncode == 9
    )
    splice = Sockmap(name=name)
    assert splice.cgroup.exists() and splice.pins.exists()  # the crash left them
    try:
        with caplog.at_level("WARNING", logger="legation.capture.ebpf"):
            splice.start()
        assert "removed a leftover of an earlier run: sock_ops program" in caplog.text
        assert _echo(20, splice.preexec()) == _expected(20)
        assert splice.stats()["spliced"] >= 21
    finally:
        splice.stop()
    assert not splice.cgroup.exists() and not splice.pins.exists()


@needs_ebpf
def test_a_start_never_takes_a_live_runs_cgroup_for_a_leftover(sockmap: Sockmap) -> None:
    ids = sockmap.program_ids()
    rival = Sockmap(name=sockmap.name)
    with pytest.raises(CaptureError, match="belongs to a running process") as refused:
        rival.start()
    assert refused.value.code == "capture_in_use"
    with pytest.raises(CaptureError, match="belongs to a running process"):
        rival.stop()
    shown = bpftool("cgroup", "show", str(sockmap.cgroup), parse=True)
    assert [p["id"] for p in shown] == [ids["legation_sockops"]]  # still attached
    assert _echo(10, sockmap.preexec()) == _expected(10)
    assert sockmap.stats()["spliced"] >= 11


SYSTEM_PYTHON = Path("/usr/bin/python3")  # readable by nobody, unlike a venv under /root


@pytest.mark.skipif(not SYSTEM_PYTHON.exists(), reason="no /usr/bin/python3 to run as nobody")
def test_refuses_without_root_and_names_what_is_missing() -> None:
    code = (
        "from legation.capture.ebpf import Sockmap\n"
        "try:\n    Sockmap(name='nonroot').start()\n"
        "except Exception as exc:\n    print(type(exc).__name__, exc.code, exc)\n"
    )

    def nobody() -> None:
        os.setgroups([])
        os.setgid(65534)
        os.setuid(65534)

    run = subprocess.run(
        [str(SYSTEM_PYTHON), "-c", code],
        env={"PYTHONPATH": str(Path(legation.__file__).parent.parent)},
        cwd="/",
        preexec_fn=nobody if os.geteuid() == 0 else None,
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    refusal = "CaptureError capture_unavailable --ebpf needs what this machine lacks: root ("
    assert run.stdout.startswith(refusal), run.stderr
    assert not Sockmap(name="nonroot").cgroup.exists()


def test_a_name_that_could_leave_its_directory_is_refused() -> None:
    for bad in ("../x", "a/b", "", "UPPER", "x" * 49):
        with pytest.raises(CaptureError, match="must match"):
            Sockmap(name=bad)


def test_attaching_to_anything_but_its_own_cgroup_is_refused() -> None:
    splice = Sockmap(name=_name())
    splice.cgroup = splice.cgroup_root  # the root cgroup: never
    with pytest.raises(CaptureError, match="refusing to attach"):
        splice._check_cgroup()


@pytest.mark.skipif(shutil.which("clang") is None, reason="clang missing (Debian package clang)")
def test_the_object_is_built_once_per_source_and_rebuilt_when_it_changes(tmp_path: Path) -> None:
    first = build_object(cache=tmp_path)
    stamp = first.stat().st_mtime_ns
    assert build_object(cache=tmp_path) == first and first.stat().st_mtime_ns == stamp
    assert first.read_bytes()[:4] == b"\x7fELF"
    edited = tmp_path / "sockmap.bpf.c"
    edited.write_text(SOURCE.read_text() + "\n// edited\n")
    assert build_object(edited, cache=tmp_path).parent != first.parent
    broken = tmp_path / "broken.bpf.c"
    broken.write_text("int oops(void) { return undefined_name; }\n")
    with pytest.raises(CaptureError, match=r"clang .* failed: .*undefined_name"):
        build_object(broken, cache=tmp_path)
    assert not list(tmp_path.rglob("*.partial"))


@pytest.mark.skipif(shutil.which("clang") is None, reason="clang missing (Debian package clang)")
@pytest.mark.skipif(os.geteuid() != 0, reason="planting another user's file needs root (chown)")
def test_a_cache_entry_root_did_not_write_alone_is_refused_never_loaded(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    good = build_object(cache=cache)
    planted = good.read_bytes()
    os.chown(good, 65534, 65534)  # another user's object under the right name
    with pytest.raises(CaptureError, match=r"owned by uid 65534, not 0"):
        build_object(cache=cache)
    os.chown(good, 0, 0)
    good.chmod(0o666)  # anyone could have replaced it
    with pytest.raises(CaptureError, match=r"writable by group or others"):
        build_object(cache=cache)
    good.chmod(0o644)
    assert build_object(cache=cache) == good and good.read_bytes() == planted
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    key_dir = good.parent
    shutil.rmtree(key_dir)
    key_dir.symlink_to(elsewhere, target_is_directory=True)  # the key directory redirected
    with pytest.raises(CaptureError, match=r"is a symlink"):
        build_object(cache=cache)
    key_dir.unlink()
    cache.chmod(0o777)
    with pytest.raises(CaptureError, match=r"cache .*cache is writable by group or others"):
        build_object(cache=cache)


@pytest.mark.skipif(shutil.which("clang") is None, reason="clang missing (Debian package clang)")
@pytest.mark.skipif(os.geteuid() != 0, reason="planting another user's file needs root (chown)")
def test_what_is_loaded_is_read_through_one_checked_descriptor(tmp_path: Path) -> None:
    """The path checks can be raced by whoever may rename a directory above the cache; the
    bytes loaded are read through a descriptor whose owner and mode are checked (attacker
    review: the swapped-in object was loaded by path)."""
    from legation.capture.ebpf._build import read_trusted

    good = build_object(cache=tmp_path / "cache")
    assert read_trusted(good)[:4] == b"\x7fELF"
    swapped = tmp_path / "swapped.o"  # what a rename race leaves at the path: another's file
    swapped.write_bytes(b"attacker object")
    os.chown(swapped, 65534, 65534)
    with pytest.raises(CaptureError, match="not a file only this user wrote"):
        read_trusted(swapped)
    link = tmp_path / "link.o"
    link.symlink_to(good)
    with pytest.raises(CaptureError, match="cannot open"):
        read_trusted(link)


def test_the_cache_directories_are_made_private_whatever_the_umask(tmp_path: Path) -> None:
    if shutil.which("clang") is None:
        pytest.skip("clang missing (Debian package clang)")
    old = os.umask(0o002)
    try:
        obj = build_object(cache=tmp_path / "a" / "b" / "cache")
    finally:
        os.umask(old)
    for level in (tmp_path / "a", tmp_path / "a" / "b", obj.parent.parent, obj.parent):
        assert level.stat().st_mode & 0o777 == 0o700, level
    assert build_object(cache=tmp_path / "a" / "b" / "cache") == obj  # and it trusts them
