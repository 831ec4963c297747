"""``--ebpf``: splice same-host socket pairs of the mesh's processes (merbridge's idea).

:class:`Sockmap` builds ``sockmap.bpf.c`` with clang (cached), loads it with bpftool, pins the
programs and maps under ``/sys/fs/bpf/legation-<name>/``, creates the cgroup v2
``legation-<name>`` and attaches the sockops program to that cgroup only (never the root cgroup)
and the sk_msg program to the sockhash. Processes joined to the cgroup (:meth:`Sockmap.join`, or
:meth:`Sockmap.preexec` for a child before it execs) have their established IPv4 TCP sockets
recorded; when both ends of a connection are recorded in the same network namespace, bytes one end
sends go straight to the other's receive queue. :meth:`Sockmap.stop` detaches, moves processes
out, removes the cgroup and unpins; :meth:`Sockmap.start` first removes what a crashed run with the
same name left (and refuses a cgroup a live run holds). :meth:`Sockmap.redirect` adds the
connect-time redirection of ``--capture --ebpf`` (:mod:`legation.capture.ebpf.redirect`).
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import TracebackType

from legation.capture.ebpf import _owned
from legation.capture.ebpf._build import build_object, read_trusted
from legation.capture.ebpf._kernel import (
    BPFFS,
    bpftool,
    cgroup2_root,
    ensure_bpffs,
    missing_features,
)
from legation.capture.ebpf.redirect import Redirection
from legation.capture.errors import CaptureError

log = logging.getLogger("legation.capture.ebpf")
# the order of legation_stats in sockmap.bpf.c
STATS = ("recorded", "spliced", "passed", "redirected", "original", "inbound")


class Sockmap:
    """The sockops + sk_msg splice for one mesh, attached to that mesh's own cgroup."""

    def __init__(self, *, name: str, bpffs: Path = BPFFS) -> None:
        self.name = name
        self.bpffs = bpffs
        root = cgroup2_root()
        self.cgroup_root = root if root is not None else Path("/sys/fs/cgroup")
        self.cgroup = _owned.owned_dir(self.cgroup_root, name)
        self.pins = _owned.owned_dir(bpffs, name)
        self.home = _owned.own_cgroup(self.cgroup_root)  # where joined processes go back to
        self.started = False
        self._lock: int | None = None  # an flock on the cgroup directory while this owns it
        self._redirection: Redirection | None = None

    @classmethod
    def for_stack(cls, state_dir: Path, status_port: int) -> Sockmap:
        """The splice of one ``legation up`` (its state directory and status port name it, so a
        restart after a crash finds and removes what the crashed run left)."""
        key = f"{state_dir.resolve()}:{status_port}".encode()
        return cls(name=f"up-{hashlib.sha256(key).hexdigest()[:12]}")

    def start(self) -> Sockmap:
        """Probe, remove leftovers, build, load, pin, create the cgroup, attach. On any failure what
        was made is removed again and :class:`CaptureError` says what failed."""
        missing = missing_features()
        if missing:
            raise CaptureError(
                "--ebpf needs what this machine lacks: " + "; ".join(missing),
                code="capture_unavailable",
            )
        self._claim()
        for line in self.remove_leftovers():
            log.warning("--ebpf: removed a leftover of an earlier run: %s", line)
        self._release()
        code = read_trusted(build_object())  # loaded from a private copy, never the cache
        if ensure_bpffs(self.bpffs):
            log.info("--ebpf: mounted the bpf filesystem at %s", self.bpffs)
        self._check_cgroup()
        try:
            self.cgroup.mkdir()  # exists: another start made it since the leftovers went
        except OSError as err:
            raise CaptureError(f"--ebpf: cannot create cgroup {self.cgroup}: {err}") from None
        self._claim()
        try:
            self.pins.mkdir()
            with tempfile.TemporaryDirectory(prefix="legation-bpf-") as private:  # 0700, ours
                obj = Path(private) / "sockmap.bpf.o"
                obj.write_bytes(code)
                bpftool(
                    "prog", "loadall", str(obj), str(self.pins / "progs"),
                    "pinmaps", str(self.pins / "maps"),
                )  # fmt: skip
            bpftool(
                "cgroup", "attach", str(self.cgroup),
                "sock_ops", "pinned", str(self.pins / _owned.SOCKOPS_PROG),
            )  # fmt: skip
            bpftool(
                "prog", "attach", "pinned", str(self.pins / _owned.MSG_PROG),
                "msg_verdict", "pinned", str(self.pins / _owned.PAIRS_MAP),
            )  # fmt: skip
        except BaseException:
            self.remove_leftovers()
            self._release()
            raise
        self.started = True
        log.debug("--ebpf: sockops on %s, sk_msg on %s", self.cgroup, self.pins / _owned.PAIRS_MAP)
        return self

    def _claim(self) -> None:
        """Hold an flock on the cgroup directory (if it exists) for as long as this object owns
        it. The kernel drops the lock when the holder dies, however it dies: a cgroup that cannot
        be locked belongs to a live run, and is refused rather than taken as a leftover."""
        if self._lock is not None or not self.cgroup.is_dir():
            return
        fd = os.open(self.cgroup, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise CaptureError(
                f"--ebpf: {self.cgroup} belongs to a running process (another legation up with "
                "the same state directory and status port?); nothing started, nothing removed",
                code="capture_in_use",
            ) from None
        self._lock = fd

    def _release(self) -> None:
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def _check_cgroup(self) -> None:
        """Refuse anything but a direct child of the cgroup v2 root named legation-*."""
        cgroup = self.cgroup.resolve()
        if cgroup.parent != self.cgroup_root.resolve() or not cgroup.name.startswith("legation-"):
            raise CaptureError(
                f"--ebpf: refusing to attach to {cgroup}: not a cgroup Legation created"
            )

    def join(self, pid: int) -> None:
        """Move process ``pid`` into the mesh's cgroup. Only sockets it creates afterwards are
        recorded, so children should join before they open any (see :meth:`preexec`)."""
        (self.cgroup / "cgroup.procs").write_text(str(pid))

    def preexec(self) -> Callable[[], None]:
        """A ``preexec_fn`` that moves the child into the cgroup between fork and exec."""
        procs = os.fsencode(self.cgroup / "cgroup.procs")

        def enter() -> None:  # runs in the child: a plain open/write/close
            fd = os.open(procs, os.O_WRONLY)
            try:
                os.write(fd, b"0")
            finally:
                os.close(fd)

        return enter

    def redirect(
        self,
        pods: Mapping[str, int],
        proxy_gid: int,
        services: Iterable[tuple[str, int]],
        inbound: Iterable[tuple[str, int, int]] = (),
    ) -> None:
        """Connect-time redirection in ``pods`` (network namespace -> sidecar outbound port) to
        ``services`` ((virtual IP, port)), and of sidecars' connects to ``inbound`` ((pod address,
        app port, inbound port)); see :mod:`legation.capture.ebpf.redirect`. Called again with
        the current ones after a reload."""
        if self._redirection is None:
            self._redirection = Redirection(cgroup=self.cgroup, pins=self.pins)
        self._redirection.follow(pods, proxy_gid, services, inbound)

    def stats(self) -> dict[str, int]:
        """Sockets recorded, messages spliced to the peer, messages sent the normal way, connects
        redirected to a sidecar, original destinations answered, connects sent to a pod's inbound
        port (the last three: :mod:`legation.capture.ebpf.redirect`)."""
        rows = bpftool("map", "dump", "pinned", str(self.pins / _owned.STATS_MAP), parse=True) or []
        values = {_number(row["key"]): _number(row["value"]) for row in rows}
        return {label: values.get(index, 0) for index, label in enumerate(STATS)}

    def program_ids(self) -> dict[str, int]:
        """Kernel ids of the loaded programs, by name (to find them in ``bpftool cgroup tree``)."""
        ids = {}
        for prog in ("legation_sockops", "legation_msg"):
            shown = bpftool("prog", "show", "pinned", str(self.pins / "progs" / prog), parse=True)
            ids[prog] = int(shown["id"])
        return ids

    def remove_leftovers(self) -> list[str]:
        """Remove this name's cgroup and pins, whoever made them (an earlier, crashed run)."""
        return _owned.remove_owned(self.cgroup, self.pins, self.home)

    def stop(self) -> None:
        """Detach, move processes out, remove the cgroup, unpin. Idempotent."""
        self.started = False
        if self._lock is None and self.cgroup.is_dir():
            self._claim()  # never tear down what another live run owns
        try:
            for line in self.remove_leftovers():
                log.debug("--ebpf: removed %s", line)
        finally:
            self._release()
            self._redirection = None

    def __enter__(self) -> Sockmap:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _number(raw: list[str]) -> int:
    """A map key or value as bpftool -j prints it (hex bytes, host order) as an integer."""
    return int.from_bytes(bytes(int(byte, 16) for byte in raw), sys.byteorder)
