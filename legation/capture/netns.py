"""The namespaces: one bridge per capture range, and a network namespace per sidecar instance (a
"pod"), joined to the bridge by a veth pair, with its hosts file and capture rules.

Everything Legation creates carries a tag derived from the capture range, so a later ``legation
up`` finds and removes what a crashed one left (:meth:`Network.clean`), and it touches nothing
else: the bridge ``lgb<tag>``, the host ends of the veth pairs ``lg<tag><instance hash>``, the
namespaces ``legation-<tag>-<instance>`` and their directories ``/etc/netns/<namespace>/`` (``ip
netns exec`` bind-mounts the ``hosts`` file there over ``/etc/hosts``). No rule is ever added to
the host's network namespace: the capture rules live in the pods' own.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import ipaddress
import os
import shutil
import signal
import stat
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from legation.capture.errors import CaptureError
from legation.config.capture import Capture

ETC_NETNS = Path("/etc/netns")
LOCK_DIR = Path("/run/legation")  # root-owned 0700: not /run/lock, which anyone may write
NETNS_PREFIX = "legation-"
_TOOLS = ("ip", "iptables-restore", "sysctl")
_V6, _V6_DEVS = "net.ipv6.conf", ("all", "default")
_CAPS = {"CAP_NET_ADMIN": 12, "CAP_SYS_ADMIN": 21}


def _effective() -> int:
    """This process's effective capabilities (a bit set), 0 if unknown."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return 0
    line = next((x for x in status.splitlines() if x.startswith("CapEff:")), "CapEff: 0")
    return int(line.split()[1], 16)


@dataclass(frozen=True, slots=True)
class Pod:
    """One instance's namespace: its name, the host end of its veth pair, its address."""

    instance: str
    netns: str
    veth: str
    ip: str

    def exec_argv(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside the namespace (with its hosts file as ``/etc/hosts``)."""
        return ["ip", "netns", "exec", self.netns, *argv]


def _short(text: str, n: int) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def run(argv: Sequence[str], *, stdin: str | None = None) -> str:
    """Run one command (an argument list, never a shell string); its stdout, or
    :class:`CaptureError` naming the command and its error output."""
    try:
        done = subprocess.run(
            list(argv), input=stdin, capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        raise CaptureError(f"{' '.join(argv)}: {err}") from None
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).strip() or f"exit code {done.returncode}"
        raise CaptureError(f"{' '.join(argv)}: {detail}")
    return done.stdout


def missing() -> list[str]:
    """What capture needs and this machine lacks (empty: all there)."""
    out = []
    lacking = [name for name, bit in _CAPS.items() if not _effective() >> bit & 1]
    if lacking:
        out.append(f"root ({' and '.join(lacking)}, for network namespaces and iptables)")
    out += [f"the {tool!r} command" for tool in _TOOLS if shutil.which(tool) is None]
    if not Path("/proc/self/ns/net").exists():
        out.append("network namespaces in the kernel (/proc/self/ns/net)")
    return out


def require() -> None:
    """Raise ``capture_unavailable`` naming what is missing, if anything is."""
    lacking = missing()
    if lacking:
        raise CaptureError(
            "--capture needs " + "; ".join(lacking) + " (run without --capture otherwise)",
            code="capture_unavailable",
        )


class Network:
    """The bridge and pods of one capture range."""

    def __init__(self, capture: Capture) -> None:
        self.capture = capture
        self.tag = _short(str(capture.cidr), 6)
        self.bridge = f"lgb{self.tag}"
        self.prefix = f"{NETNS_PREFIX}{self.tag}-"

    def lock(self) -> int:
        """Take this range for the calling process (an ``flock`` the kernel drops when the
        process dies, so a crashed run's range is free again); the lock's descriptor. Raises
        ``capture_in_use`` if a live run holds it: its pods are not leftovers."""
        LOCK_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.lstat(LOCK_DIR)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
            raise CaptureError(
                f"{LOCK_DIR} must be a directory of this user's that no one else may write",
                code="capture_unavailable",
            )
        path = LOCK_DIR / f"legation-capture-{self.tag}.lock"
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
        try:
            fd = os.open(path, flags, 0o600)
        except OSError as err:  # e.g. a symlink planted there: never followed
            raise CaptureError(
                f"cannot open the capture lock {path}: {err.strerror}", code="capture_unavailable"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise CaptureError(
                f"capture.cidr {self.capture.cidr} is in use by a running legation up (its lock "
                f"{path} is held); nothing started, nothing removed",
                code="capture_in_use",
            ) from None
        return fd

    def pod(self, instance: str) -> Pod:
        return Pod(
            instance=instance,
            netns=self.prefix + instance,
            veth=f"lg{self.tag}{_short(instance, 7)}",
            ip=self.capture.instance_ip(instance),
        )

    def clean(self) -> list[str]:
        """Remove every namespace, link and ``/etc/netns`` directory of this range: what a
        crashed run left, or what this one made. What was removed."""
        removed = []
        for name in run(["ip", "netns", "list"]).split():
            if name.startswith(self.prefix):
                # whatever still runs in it (an app that outlived its stop) goes first
                for pid in run(["ip", "netns", "pids", name]).split():
                    with contextlib.suppress(ProcessLookupError, ValueError):
                        os.kill(int(pid), signal.SIGKILL)
                run(["ip", "netns", "delete", name])
                removed.append(name)
        for line in run(["ip", "-o", "link", "show"]).splitlines():
            name = line.split(":", 2)[1].strip().split("@")[0] if ":" in line else ""
            if name == self.bridge or (name.startswith(f"lg{self.tag}") and len(name) == 15):
                try:
                    run(["ip", "link", "delete", name])
                except CaptureError:  # a veth gone with its namespace meanwhile
                    if name in run(["ip", "-o", "link", "show"]):
                        raise
                removed.append(name)
        if ETC_NETNS.is_dir():
            for path in ETC_NETNS.glob(self.prefix + "*"):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(str(path))
        return removed

    def check_range(self) -> None:
        """Refuse a range the host already routes (another network's, not this bridge's)."""
        for line in run(["ip", "-4", "-o", "route", "show"]).splitlines():
            words = line.split()
            if not words or words[0] == "default" or f"dev {self.bridge}" in line:
                continue
            try:
                theirs = ipaddress.IPv4Network(words[0], strict=False)
            except ValueError:
                continue
            if theirs.overlaps(self.capture.cidr):
                raise CaptureError(
                    f"capture.cidr {self.capture.cidr} overlaps the host's route {line.strip()!r}:"
                    " choose another range",
                    code="capture_unavailable",
                )

    def create_bridge(self) -> None:
        prefix = self.capture.cidr.prefixlen
        run(["ip", "link", "add", self.bridge, "type", "bridge"])
        run(["ip", "addr", "add", f"{self.capture.bridge_ip}/{prefix}", "dev", self.bridge])
        run(["ip", "link", "set", self.bridge, "up"])

    def add_pod(self, pod: Pod, *, hosts: str, rules: str) -> None:
        """The namespace, its veth pair, address, default route via the bridge, its hosts file
        and its capture rules (``iptables-restore`` input)."""
        prefix = self.capture.cidr.prefixlen
        ns = ["ip", "-n", pod.netns]
        run(["ip", "netns", "add", pod.netns])
        # IPv4 only, like the capture rules: with IPv6 on, eth0's link-local address would let
        # an app reach another pod's app (listening on ::) past both sidecars
        run(pod.exec_argv(["sysctl", "-q", "-w", *(f"{_V6}.{d}.disable_ipv6=1" for d in _V6_DEVS)]))
        # the peer is born inside the namespace: the host may have an eth0 of its own
        run(
            [
                "ip",
                "link",
                "add",
                pod.veth,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                pod.netns,
            ]
        )
        run(["ip", "link", "set", pod.veth, "master", self.bridge, "up"])
        run([*ns, "addr", "add", f"{pod.ip}/{prefix}", "dev", "eth0"])
        run([*ns, "link", "set", "eth0", "up"])
        run([*ns, "link", "set", "lo", "up"])
        run([*ns, "route", "add", "default", "via", self.capture.bridge_ip])
        self.write_hosts(pod, hosts)
        run(pod.exec_argv(["iptables-restore"]), stdin=rules)

    def write_hosts(self, pod: Pod, hosts: str) -> None:
        """Rewritten in place, so processes already running see the new names too."""
        directory = ETC_NETNS / pod.netns
        directory.mkdir(parents=True, exist_ok=True)
        with open(directory / "hosts", "w") as f:
            f.write(hosts)

    def remove_pod(self, pod: Pod) -> None:
        run(["ip", "netns", "delete", pod.netns])
        shutil.rmtree(ETC_NETNS / pod.netns, ignore_errors=True)
        # the veth pair goes with the namespace; a host end left behind is removed by clean()
