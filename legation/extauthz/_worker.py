"""One evaluator process and the pipes to it (:mod:`legation.extauthz._evaluator` is the other
end), and the short-lived evaluator runs that validate a policy version or list its tests.
:mod:`legation.extauthz.evaluator` keeps a pool of these."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

from legation.errors import ConfigError

_CMD = (sys.executable, "-P", "-m", "legation.extauthz._evaluator")  # -P: not the cwd's modules
_LIMIT = 64 * 1024 * 1024  # longest answer line accepted from an evaluator (a result document)
_ENV = {**os.environ, "PYTHONIOENCODING": "utf-8", "GOMAXPROCS": "1"}
_MEMORY_ENV = "LEGATION_EVALUATOR_MEMORY_MB"  # read by the evaluator before the engine loads

Modules = Sequence[tuple[str, str]]
Data = Sequence[tuple[str, str, Sequence[str]]]  # (path, JSON text, place under data)


class EvaluationError(Exception):
    """The engine could not evaluate: a builtin error, a crash, a conflict. Never "undefined"."""


def load_line(modules: Modules, data: Data) -> bytes:
    spec = {
        "modules": [list(m) for m in modules],
        "data": [[path, text, list(at)] for path, text, at in data],
    }
    return b"L " + json.dumps(spec, ensure_ascii=False).encode("utf-8", "surrogatepass") + b"\n"


def validate(modules: Modules, data: Data, *, timeout_s: float) -> None:
    """Load the policies in a fresh evaluator process; raises ConfigError naming the file and
    line when they do not compile (unknown functions included) or the process dies or hangs."""
    try:
        proc = subprocess.run(
            _CMD,
            input=load_line(modules, data),
            capture_output=True,
            timeout=timeout_s,
            env=_ENV,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise ConfigError(
            f"compiling the policies took longer than {timeout_s:g} s", code="policy_compile_failed"
        ) from None
    answer = proc.stdout.decode("utf-8", "replace").splitlines()
    if answer and answer[0] == "L ok":
        return
    if answer and answer[0].startswith("L err "):
        raise ConfigError(str(json.loads(answer[0][6:])), code="policy_compile_failed")
    raise ConfigError(
        f"the policy engine exited while compiling ({_exit(proc.returncode)})",
        code="policy_crashed",
    )


def parse_tests(modules: Modules, *, timeout_s: float) -> list[list[Any]]:
    """The test rules of each module, found by OPA's parser in a fresh evaluator process
    (the ``P`` operation): ``[[path, package, [rule...]]...]``; raises ConfigError when a
    module does not parse."""
    line = (
        b"P "
        + json.dumps({"modules": [list(m) for m in modules]}, ensure_ascii=False).encode(
            "utf-8", "surrogatepass"
        )
        + b"\n"
    )
    try:
        proc = subprocess.run(
            _CMD, input=line, capture_output=True, timeout=timeout_s, env=_ENV, check=False
        )
    except subprocess.TimeoutExpired:
        raise ConfigError(
            f"parsing the policies took longer than {timeout_s:g} s", code="policy_compile_failed"
        ) from None
    answer = proc.stdout.decode("utf-8", "replace").splitlines()
    if answer and answer[0].startswith("P ok "):
        return list(json.loads(answer[0][5:]))
    if answer and answer[0].startswith("P err "):
        raise ConfigError(str(json.loads(answer[0][6:])), code="policy_compile_failed")
    raise ConfigError(
        f"the policy engine exited while parsing ({_exit(proc.returncode)})", code="policy_crashed"
    )


def _exit(returncode: int | None) -> str:
    if returncode is None:
        return "still running"
    return f"signal {-returncode}" if returncode < 0 else f"exit status {returncode}"


class _Worker:
    """One evaluator process and the two pipes to it, driven straight from the event loop: a
    request is one ``os.write`` (the rest, if the pipe is full, when it drains), the answer is
    read by a reader callback that resolves the one waiting future. asyncio's subprocess
    streams cost ~3x the CPU per round trip for the same bytes."""

    def __init__(self, proc: _Child, to_child: int, from_child: int) -> None:
        self.proc = proc
        self.calls = 0
        self._to = to_child
        self._from = from_child
        self._loop = asyncio.get_running_loop()
        self._buffer = bytearray()
        self._pending = b""  # bytes of the current request not yet written
        self._waiter: asyncio.Future[bytes] | None = None
        self._eof = False
        os.set_blocking(to_child, False)
        os.set_blocking(from_child, False)
        self._loop.add_reader(from_child, self._readable)

    @classmethod
    async def spawn(cls, load: bytes, *, timeout_s: float, memory_mb: int = 1024) -> _Worker:
        """A loaded evaluator; raises ConfigError (the policies do not load), TimeoutError or
        OSError (the process could not be started or loaded in time)."""
        child_in, to_child = os.pipe()
        try:
            from_child, child_out = os.pipe()
        except BaseException:
            os.close(child_in)
            os.close(to_child)
            raise
        try:
            popen = subprocess.Popen(
                _CMD,
                stdin=child_in,
                stdout=child_out,
                stderr=subprocess.DEVNULL,
                env={**_ENV, _MEMORY_ENV: str(memory_mb)},
            )
        except BaseException:
            os.close(to_child)  # the child's ends are closed below, once each
            os.close(from_child)
            raise
        finally:
            os.close(child_in)  # the child has its copies (or never started)
            os.close(child_out)
        child: _Child | None = None
        try:
            child = _Child(popen, asyncio.get_running_loop())
            worker = cls(child, to_child, from_child)
        except BaseException:  # not watched after all: stopped and reaped here
            if child is not None:
                child._unwatch()
            popen.kill()
            popen.wait()
            os.close(to_child)
            os.close(from_child)
            raise
        try:
            async with asyncio.timeout(timeout_s):
                answer = await worker._roundtrip(load)
            if answer.startswith(b"L err "):
                raise ConfigError(str(json.loads(answer[6:])), code="policy_compile_failed")
            if answer != b"L ok\n":
                raise ConfigError("the policy engine exited while compiling", code="policy_crashed")
        except BaseException:
            worker.kill()
            await asyncio.shield(worker.wait())
            raise
        return worker

    # -- the pipes -------------------------------------------------------------------------

    def _readable(self) -> None:
        try:
            chunk = os.read(self._from, 1 << 16)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if not chunk:
            self._eof = True
            self._loop.remove_reader(self._from)
            self._answer(b"")  # a torn or missing line: the caller reports the exit
            return
        self._buffer += chunk
        if len(self._buffer) > _LIMIT:
            self._answer(b"")
            self.kill()
            return
        end = self._buffer.find(b"\n")
        if end >= 0:
            line = bytes(self._buffer[: end + 1])
            del self._buffer[: end + 1]
            self._answer(line)

    def _answer(self, line: bytes) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(line)

    def _writable(self) -> None:
        try:
            n = os.write(self._to, self._pending)
        except BlockingIOError:
            return
        except OSError:
            n = len(self._pending)  # the child is gone: its EOF answers the waiter
        self._pending = self._pending[n:]
        if not self._pending:
            self._loop.remove_writer(self._to)

    async def _roundtrip(self, line: bytes) -> bytes:
        if self._eof:
            return b""
        self._waiter = self._loop.create_future()
        try:
            n = os.write(self._to, line)
        except BlockingIOError:
            n = 0
        except OSError:
            n = len(line)
        if n < len(line):
            self._pending = line[n:]
            self._loop.add_writer(self._to, self._writable)
        return await self._waiter

    async def call(self, path: str, document: bytes) -> tuple[str, str]:
        self.calls += 1
        raw = await self._roundtrip(b"E %d %s %s\n" % (self.calls, path.encode(), document))
        if not raw.endswith(b"\n"):
            raise EvaluationError(
                f"the policy engine exited while evaluating ({_exit(self.proc.returncode)})"
            )
        ident, _, rest = raw[:-1].decode("utf-8", "replace").partition(" ")
        kind, _, payload = rest.partition(" ")
        if ident != str(self.calls) or kind not in ("v", "u", "e"):
            raise EvaluationError("the policy engine answered out of turn")
        if kind == "e":
            return kind, str(json.loads(payload))
        return kind, payload

    async def test(self, spec: dict[str, Any]) -> dict[str, Any]:
        """Run one test rule (the ``T`` operation); raises EvaluationError if the process dies."""
        self.calls += 1
        line = (
            b"T %d " % self.calls
            + json.dumps(spec, ensure_ascii=False).encode("utf-8", "surrogatepass")
            + b"\n"
        )
        raw = await self._roundtrip(line)
        prefix = b"%d t " % self.calls
        if not raw.endswith(b"\n"):
            raise EvaluationError(
                f"the policy engine exited while evaluating ({_exit(self.proc.returncode)})"
            )
        if not raw.startswith(prefix):
            raise EvaluationError("the policy engine answered out of turn")
        answer: dict[str, Any] = json.loads(raw[len(prefix) :])
        return answer

    # -- lifecycle ---------------------------------------------------------------------------

    def kill(self) -> None:
        self.proc.kill()

    def _close_pipes(self) -> None:
        if self._to >= 0:
            self._loop.remove_writer(self._to)
            os.close(self._to)
            self._to = -1
        if self._from >= 0:
            self._loop.remove_reader(self._from)
            os.close(self._from)
            self._from = -1
        self._answer(b"")

    async def wait(self) -> None:
        """Until the process has exited; the pipes are closed then, or when the wait is
        cancelled (a pool closing, a loop shutting down): nothing else would close them."""
        try:
            await self.proc.wait()
        finally:
            self._close_pipes()


class _Child:
    """An evaluator process, started by :class:`subprocess.Popen` and watched through a pidfd.

    Not ``loop.subprocess_exec``: uvloop's spawn forks and runs every ``os.register_at_fork``
    hook in the child before exec (asyncio's own loop runs none). OpenTelemetry registers such
    hooks, and one that blocks there keeps the child from exec'ing and the service's loop,
    waiting in the spawn, with it (``legation.envoy_process.tied_to_parent`` avoids
    ``preexec_fn`` for the same reason). ``Popen`` runs no Python between fork and exec on any
    loop, and keeps the signals the service ignores ignored, as before.

    From its start the process is watched on a pidfd (Linux 5.3 and later): while the loop
    that started it runs, it is reaped as soon as it exits, idle or not, as asyncio's child
    watcher did, and it is signalled through the pidfd, so a signal can never reach a reused
    pid. Where there are no pidfds, or for a wait from another loop, a thread waits."""

    __slots__ = ("_exited", "_loop", "_pidfd", "_popen", "pid")

    def __init__(self, popen: subprocess.Popen[bytes], loop: asyncio.AbstractEventLoop) -> None:
        self._popen = popen
        self.pid = popen.pid
        self._loop = loop
        self._exited: asyncio.Future[None] = loop.create_future()
        try:
            self._pidfd = os.pidfd_open(popen.pid)
        except (AttributeError, OSError):  # no pidfds here
            self._pidfd = -1
            return
        loop.add_reader(self._pidfd, self._reap)

    def _reap(self) -> None:
        """The pidfd is readable: the process has exited. Reap it, stop watching."""
        self._unwatch()
        self._popen.poll()
        if not self._exited.done():
            self._exited.set_result(None)

    def _unwatch(self) -> None:
        if self._pidfd >= 0:
            self._loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = -1

    def __del__(self) -> None:
        # still watched only if its loop closed first (a live loop's reader holds this object):
        # nothing will read the pidfd any more
        if getattr(self, "_pidfd", -1) >= 0:  # (-1 too if __init__ stopped early)
            os.close(self._pidfd)

    @property
    def returncode(self) -> int | None:
        """The exit status once the process has exited (reaping it), else None."""
        return self._popen.poll()

    def kill(self) -> None:
        """SIGKILL, unless it has already exited."""
        if self._pidfd >= 0:  # still watched: the pidfd names this process, never another
            try:
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
                return
            except ProcessLookupError:
                return
            except OSError:  # not allowed here (a seccomp profile): by pid, as below
                pass
        if self._popen.poll() is None:  # ours until reaped: its pid is not reused before
            with contextlib.suppress(ProcessLookupError):
                self._popen.kill()

    async def wait(self) -> int:
        """Its exit status once it has exited, reaped; the loop runs on meanwhile (cancelling
        a wait leaves the watch in place)."""
        if self._pidfd >= 0 and asyncio.get_running_loop() is self._loop:
            await asyncio.shield(self._exited)
        elif self._popen.poll() is None:
            await asyncio.to_thread(self._popen.wait)
        return self._popen.wait()
