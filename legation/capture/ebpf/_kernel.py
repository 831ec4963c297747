"""The kernel side of ``--ebpf``: bpftool, the cgroup v2 and bpf filesystem mounts, the probe.

Every command runs as an argument list (never a shell string); a failing one raises
:class:`~legation.capture.errors.CaptureError` naming the command and its error output.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

from legation.capture.errors import CaptureError

BPFFS = Path("/sys/fs/bpf")
LIBBPF_HEADER = Path("/usr/include/bpf/bpf_helpers.h")
_OCTAL = re.compile(r"\\([0-7]{3})")  # mountinfo writes a space in a path as \040
_SBIN = ("/usr/sbin", "/sbin")  # bpftool lives here; a non-root PATH may not list them
# what the programs need: program types, map types, and helpers per program type (bpftool's names)
_PROG_TYPES = ("sock_ops", "sk_msg", "cgroup_sock_addr", "cgroup_sockopt")
_MAP_TYPES = ("sockhash", "sk_storage", "lru_hash")
_HELPERS = {
    "sock_ops": ("bpf_sock_hash_update", "bpf_get_netns_cookie"),
    "sk_msg": ("bpf_msg_redirect_hash", "bpf_get_netns_cookie", "bpf_sk_storage_get"),
    "cgroup_sock_addr": ("bpf_get_socket_cookie", "bpf_get_netns_cookie"),
    "cgroup_sockopt": ("bpf_get_netns_cookie",),
}


def bpftool_path() -> str | None:
    """The bpftool binary, or None."""
    found = shutil.which("bpftool")
    if found:
        return found
    for directory in _SBIN:
        candidate = Path(directory, "bpftool")
        if os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def bpftool(*args: str, parse: bool = False, timeout: float = 30.0) -> Any:
    """Run ``bpftool ARGS`` (``-j`` added when ``parse``); return the parsed JSON or None."""
    tool = bpftool_path()
    if tool is None:
        raise CaptureError(
            "--ebpf: bpftool not found (Debian package bpftool)", code="capture_unavailable"
        )
    command = [tool, *(["-j"] if parse else []), *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).strip()
        raise CaptureError(f"--ebpf: {' '.join(command)} failed: {detail}")
    if not parse:
        return None
    return json.loads(done.stdout) if done.stdout.strip() else None


def _mounts() -> list[tuple[str, str]]:
    """(mount point, filesystem type) of this mount namespace, from /proc/self/mountinfo."""
    return parse_mountinfo(Path("/proc/self/mountinfo").read_text())


def parse_mountinfo(text: str) -> list[tuple[str, str]]:
    """(mount point, filesystem type) per line of mountinfo ``text``: the fifth field (octal
    escapes decoded) and the first after the `` - `` separator; a line without both is skipped."""
    found = []
    for line in text.splitlines():
        head, sep, tail = line.partition(" - ")
        fields, after = head.split(), tail.split()
        if sep and len(fields) >= 5 and after:
            found.append((_OCTAL.sub(lambda m: chr(int(m[1], 8)), fields[4]), after[0]))
    return found


def cgroup2_root() -> Path | None:
    """Where the cgroup v2 hierarchy is mounted (/sys/fs/cgroup on unified hosts,
    /sys/fs/cgroup/unified on hybrid ones), or None."""
    points = [Path(point) for point, fstype in _mounts() if fstype == "cgroup2"]
    return min(points, key=lambda p: len(p.parts)) if points else None


def bpffs_mounted(path: Path = BPFFS) -> bool:
    return any(Path(point) == path and fstype == "bpf" for point, fstype in _mounts())


def ensure_bpffs(path: Path = BPFFS) -> bool:
    """Mount the bpf filesystem at ``path`` unless it is mounted there; True when this call
    mounted it. It is the standard mount (systemd makes it at boot) and is left in place: other
    programs may pin there too, so Legation removes only its own directory in it."""
    if bpffs_mounted(path):
        return False
    done = subprocess.run(
        ["mount", "-t", "bpf", "bpf", str(path)], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise CaptureError(f"--ebpf: mount -t bpf bpf {path} failed: {done.stderr.strip()}")
    return True


def missing_features() -> list[str]:
    """What ``--ebpf`` needs and this machine lacks, one entry per missing thing, named so a person
    knows what to install or enable; empty when everything is there."""
    missing = []
    if os.geteuid() != 0:
        missing.append("root (loading BPF programs and creating cgroups needs euid 0)")
    if shutil.which("clang") is None:
        missing.append("clang (Debian package clang)")
    if not LIBBPF_HEADER.exists():
        missing.append(f"{LIBBPF_HEADER} (Debian package libbpf-dev)")
    if bpftool_path() is None:
        missing.append("bpftool (Debian package bpftool)")
    if cgroup2_root() is None:
        missing.append("a cgroup v2 mount (cgroup2 in /proc/self/mountinfo)")
    if "\tbpf\n" not in Path("/proc/filesystems").read_text() + "\n":
        missing.append("the bpf filesystem (kernel CONFIG_BPF_SYSCALL)")
    if missing:
        return missing  # the kernel probe needs root and bpftool
    return _missing_kernel_features()


def _missing_kernel_features() -> list[str]:
    try:
        probe = bpftool("feature", "probe", "kernel", parse=True)
    except CaptureError as exc:
        return [f"a kernel feature probe ({exc})"]
    missing = []
    for prog in _PROG_TYPES:
        if not probe.get("program_types", {}).get(f"have_{prog}_prog_type"):
            missing.append(f"kernel BPF program type {prog}")
    for kind in _MAP_TYPES:
        if not probe.get("map_types", {}).get(f"have_{kind}_map_type"):
            missing.append(f"kernel BPF map type {kind}")
    for prog, helpers in _HELPERS.items():
        available = probe.get("helpers", {}).get(f"{prog}_available_helpers", [])
        missing += [f"kernel BPF helper {h} for {prog}" for h in helpers if h not in available]
    return missing
