"""What ``--ebpf`` owns on the host, and how to remove it without any state kept in memory.

Two places, both named ``legation-<name>``: a cgroup directly under the cgroup v2 root, and a
directory in the bpf filesystem holding the pinned programs (``progs/``) and maps (``maps/``).
:func:`remove_owned` works from those paths alone, so a start removes what a crashed run left:
it detaches the programs, moves any process still in the cgroup back out, removes the cgroup and
unpins everything.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

from legation.capture.ebpf._kernel import bpftool
from legation.capture.errors import CaptureError

NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,47}")
SOCKOPS_PROG = "progs/legation_sockops"
MSG_PROG = "progs/legation_msg"
PAIRS_MAP = "maps/legation_pairs"
STATS_MAP = "maps/legation_stats"
CONNECT_PROG = "progs/legation_connect4"
GETSOCKOPT_PROG = "progs/legation_getsockopt"
PODS_MAP = "maps/legation_pods"
SERVICES_MAP = "maps/legation_services"
INBOUND_MAP = "maps/legation_inbound"
# bpftool cgroup show's attach_type -> the name bpftool cgroup detach takes
ATTACH_TYPES = {
    "cgroup_sock_ops": "sock_ops",
    "cgroup_inet4_connect": "connect4",
    "cgroup_getsockopt": "getsockopt",
}


def owned_dir(parent: Path, name: str) -> Path:
    """``parent/legation-<name>``; refuses a name that could leave ``parent``."""
    if not NAME.fullmatch(name):
        raise CaptureError(
            f"--ebpf: name {name!r} must match {NAME.pattern} (it names a cgroup and a bpffs dir)"
        )
    return parent / f"legation-{name}"


def own_cgroup(cgroup_root: Path) -> Path:
    """The cgroup v2 this process is in (where processes go back to), as a path under the mount."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return cgroup_root / line[3:].lstrip("/")
    return cgroup_root


def remove_owned(cgroup: Path, pins: Path, home: Path) -> list[str]:
    """Detach, move processes out (to ``home``, or the parent when ``home`` is the cgroup itself),
    remove the cgroup, unpin; return what was removed (for the log). A step that finds nothing to
    do is skipped, so this is safe to call on a clean host."""
    removed: list[str] = []
    if cgroup.is_dir():
        for prog in bpftool("cgroup", "show", str(cgroup), parse=True) or []:
            kind = ATTACH_TYPES.get(prog["attach_type"], prog["attach_type"])
            bpftool("cgroup", "detach", str(cgroup), kind, "id", str(prog["id"]))
            removed.append(f"{kind} program {prog['id']} on {cgroup}")
    if (pins / MSG_PROG).exists() and (pins / PAIRS_MAP).exists():
        with contextlib.suppress(CaptureError):  # not attached any more: nothing to detach
            bpftool(
                "prog",
                "detach",
                "pinned",
                str(pins / MSG_PROG),
                "msg_verdict",
                "pinned",
                str(pins / PAIRS_MAP),
            )
            removed.append(f"msg_verdict program on {pins / PAIRS_MAP}")
    if cgroup.is_dir():
        if home == cgroup or cgroup in home.parents:
            home = cgroup.parent
        moved = _empty_cgroup(cgroup, home)
        removed.append(f"cgroup {cgroup} ({moved} processes moved to {home})")
    if pins.is_dir():
        _unpin(pins)
        removed.append(f"pins {pins}")
    return removed


def _empty_cgroup(cgroup: Path, home: Path) -> int:
    """Move every process of ``cgroup`` (and cgroups below it) to ``home``, then rmdir them all,
    deepest first. Bounded: a process that keeps forking into it gets 20 rounds."""
    moved = 0
    for _ in range(20):
        pids = _pids(cgroup)
        if not pids:
            with contextlib.suppress(OSError):
                for below, _dirs, _files in os.walk(cgroup, topdown=False):
                    os.rmdir(below)
            if not cgroup.exists():
                return moved
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, OSError):  # exited meanwhile
                (home / "cgroup.procs").write_text(pid)
                moved += 1
    raise CaptureError(
        f"--ebpf: could not empty and remove cgroup {cgroup}: processes {_pids(cgroup)} stay"
    )


def _pids(cgroup: Path) -> list[str]:
    pids: list[str] = []
    for below, _dirs, _files in os.walk(cgroup):
        with contextlib.suppress(FileNotFoundError):
            pids += Path(below, "cgroup.procs").read_text().split()
    return pids


def _unpin(pins: Path) -> None:
    """Unpin (unlink) every pinned object under ``pins``, then remove the directories."""
    for below, _dirs, files in os.walk(pins, topdown=False):
        for name in files:
            Path(below, name).unlink(missing_ok=True)
        os.rmdir(below)
