"""Rego evaluation in evaluator processes: OPA's engine, bounded by the check's deadline.

A :class:`EvaluatorPool` keeps ``size`` evaluator processes (:mod:`legation.extauthz._evaluator`)
loaded with one policy version. :meth:`EvaluatorPool.evaluate` hands a request's input (JSON text)
to an idle one and awaits its answer on the event loop, so:

* the deadline holds: the caller's ``asyncio.timeout`` cancels the wait, and the process that was
  evaluating is killed (its CPU is bounded by the deadline) and replaced in the background;
* other requests keep being answered meanwhile, by the other processes and by checks that need
  no policy;
* an engine crash ends one process, answers that request with an error (the servicer denies) and
  is replaced; the service lives on.

:func:`validate` loads a version once in a short-lived process, synchronously: what
``legation check`` and the policy hot reload use to refuse a directory before it can serve.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

from legation.errors import ConfigError

log = logging.getLogger("legation.extauthz.evaluator")

_CMD = (sys.executable, "-m", "legation.extauthz._evaluator")
_LIMIT = 64 * 1024 * 1024  # longest answer line accepted from an evaluator (a result document)
_ENV = {**os.environ, "PYTHONIOENCODING": "utf-8", "GOMAXPROCS": "1"}
_MEMORY_ENV = "LEGATION_EVALUATOR_MEMORY_MB"  # read by the evaluator before the engine loads

Modules = Sequence[tuple[str, str]]
Data = Sequence[tuple[str, str, Sequence[str]]]  # (path, JSON text, place under data)


class EvaluationError(Exception):
    """The engine could not evaluate: a builtin error, a crash, a conflict. Never "undefined"."""


def load_line(modules: Modules, data: Data) -> bytes:
    spec = {"modules": [list(m) for m in modules],
            "data": [[path, text, list(at)] for path, text, at in data]}
    return b"L " + json.dumps(spec, ensure_ascii=False).encode("utf-8", "surrogatepass") + b"\n"


def validate(modules: Modules, data: Data, *, timeout_s: float) -> None:
    """Load the policies in a fresh evaluator process; raises ConfigError naming the file and
    line when they do not compile (unknown functions included) or the process dies or hangs."""
    try:
        proc = subprocess.run(_CMD, input=load_line(modules, data), capture_output=True,
                              timeout=timeout_s, env=_ENV, check=False)
    except subprocess.TimeoutExpired:
        raise ConfigError(f"compiling the policies took longer than {timeout_s:g} s",
                          code="policy_compile_failed") from None
    answer = proc.stdout.decode("utf-8", "replace").splitlines()
    if answer and answer[0] == "L ok":
        return
    if answer and answer[0].startswith("L err "):
        raise ConfigError(str(json.loads(answer[0][6:])), code="policy_compile_failed")
    raise ConfigError(f"the policy engine exited while compiling ({_exit(proc.returncode)})",
                      code="policy_crashed")


def parse_tests(modules: Modules, *, timeout_s: float) -> list[list[Any]]:
    """The test rules of each module, found by OPA's parser in a fresh evaluator process
    (the ``P`` operation): ``[[path, package, [rule...]]...]``; raises ConfigError when a
    module does not parse."""
    line = b"P " + json.dumps({"modules": [list(m) for m in modules]},
                              ensure_ascii=False).encode("utf-8", "surrogatepass") + b"\n"
    try:
        proc = subprocess.run(_CMD, input=line, capture_output=True, timeout=timeout_s,
                              env=_ENV, check=False)
    except subprocess.TimeoutExpired:
        raise ConfigError(f"parsing the policies took longer than {timeout_s:g} s",
                          code="policy_compile_failed") from None
    answer = proc.stdout.decode("utf-8", "replace").splitlines()
    if answer and answer[0].startswith("P ok "):
        return list(json.loads(answer[0][5:]))
    if answer and answer[0].startswith("P err "):
        raise ConfigError(str(json.loads(answer[0][6:])), code="policy_compile_failed")
    raise ConfigError(f"the policy engine exited while parsing ({_exit(proc.returncode)})",
                      code="policy_crashed")


def _exit(returncode: int | None) -> str:
    if returncode is None:
        return "still running"
    return f"signal {-returncode}" if returncode < 0 else f"exit status {returncode}"


def _strict_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def parse_result(text: str) -> Any:
    """A result document as JSON text -> its value; a duplicate key anywhere is an error, so a
    later key can never override an earlier one."""
    try:
        return json.loads(text, object_pairs_hook=_strict_object)
    except ValueError as e:
        raise EvaluationError(f"unusable result document: {e}") from None


class _Worker:
    """One evaluator process and the two pipes to it, driven straight from the event loop: a
    request is one ``os.write`` (the rest, if the pipe is full, when it drains), the answer is
    read by a reader callback that resolves the one waiting future. asyncio's subprocess
    streams cost ~3x the CPU per round trip for the same bytes."""

    def __init__(self, proc: asyncio.subprocess.Process, to_child: int, from_child: int) -> None:
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
        from_child, child_out = os.pipe()
        try:
            proc = await asyncio.create_subprocess_exec(
                *_CMD, stdin=child_in, stdout=child_out, stderr=asyncio.subprocess.DEVNULL,
                env={**_ENV, _MEMORY_ENV: str(memory_mb)})
        except BaseException:
            for fd in (child_in, to_child, from_child, child_out):
                os.close(fd)
            raise
        finally:
            with contextlib.suppress(OSError):
                os.close(child_in)
                os.close(child_out)
        worker = cls(proc, to_child, from_child)
        try:
            async with asyncio.timeout(timeout_s):
                answer = await worker._roundtrip(load)
            if answer.startswith(b"L err "):
                raise ConfigError(str(json.loads(answer[6:])), code="policy_compile_failed")
            if answer != b"L ok\n":
                raise ConfigError("the policy engine exited while compiling",
                                  code="policy_crashed")
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
            line = bytes(self._buffer[:end + 1])
            del self._buffer[:end + 1]
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
            raise EvaluationError("the policy engine exited while evaluating "
                                  f"({_exit(self.proc.returncode)})")
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
        line = (b"T %d " % self.calls
                + json.dumps(spec, ensure_ascii=False).encode("utf-8", "surrogatepass") + b"\n")
        raw = await self._roundtrip(line)
        prefix = b"%d t " % self.calls
        if not raw.endswith(b"\n"):
            raise EvaluationError("the policy engine exited while evaluating "
                                  f"({_exit(self.proc.returncode)})")
        if not raw.startswith(prefix):
            raise EvaluationError("the policy engine answered out of turn")
        answer: dict[str, Any] = json.loads(raw[len(prefix):])
        return answer

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None

    def kill(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
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
        with contextlib.suppress(ProcessLookupError):
            await self.proc.wait()
        self._close_pipes()


class EvaluatorPool:
    """``size`` evaluator processes loaded with the same modules and data."""

    def __init__(self, modules: Modules, data: Data, *, size: int = 2,
                 load_timeout_s: float = 10.0, memory_mb: int = 1024) -> None:
        self._load = load_line(modules, data)
        self.size = size
        self.load_timeout_s = load_timeout_s
        self.memory_mb = memory_mb
        self._idle: asyncio.Queue[_Worker] = asyncio.Queue()
        self._workers: set[_Worker] = set()
        self._spawning: set[asyncio.Task[None]] = set()
        self._dying: set[_Worker] = set()  # killed, not yet reaped
        self._closed = False
        self.killed = 0  # evaluations stopped at their deadline (tests, metrics)
        self.crashed = 0

    async def start(self) -> EvaluatorPool:
        """Spawn and load every process, one after the other (so that each load gets the
        machine's cores and its whole timeout); raises ConfigError if the policies do not load,
        TimeoutError or OSError if a process could not be started or loaded in time."""
        started: list[_Worker] = []
        try:
            for _ in range(self.size):
                started.append(await _Worker.spawn(self._load, timeout_s=self.load_timeout_s,
                                                   memory_mb=self.memory_mb))
        except BaseException:
            for w in started:
                w.kill()
            await asyncio.gather(*(w.wait() for w in started), return_exceptions=True)
            raise
        for w in started:
            self._workers.add(w)
            self._idle.put_nowait(w)
        return self

    async def evaluate(self, path: str, document: bytes) -> tuple[str, str]:
        """Evaluate ``data.<path>`` with ``document`` (JSON text): ``("v", value JSON)`` or
        ``("u", "")`` for undefined; raises EvaluationError when the engine fails. Cancelling
        the call (a deadline) kills the process that was evaluating."""
        if self._closed:
            raise EvaluationError("the policy version was replaced")
        worker = await self._idle.get()
        try:
            kind, payload = await worker.call(path, document)
        except asyncio.CancelledError:
            self.killed += 1
            self._replace(worker)
            raise
        except EvaluationError:
            self.crashed += 1
            self._replace(worker)
            raise
        except BaseException:
            self._replace(worker)
            raise
        self._idle.put_nowait(worker)
        if kind == "e":
            raise EvaluationError(payload)
        return kind, payload

    async def run_test(self, spec: dict[str, Any], *, timeout_s: float) -> dict[str, Any]:
        """Run one test rule (``legation policy test``) with a deadline that starts when a
        process is ready (a fresh one may still be loading after the previous test's kill);
        raises TimeoutError after killing the process that ran past it, EvaluationError if
        that process died."""
        if self._closed:
            raise EvaluationError("the policy version was replaced")
        worker = await self._idle.get()
        try:
            async with asyncio.timeout(timeout_s):
                answer = await worker.test(spec)
        except TimeoutError:
            self.killed += 1
            self._replace(worker)
            raise
        except BaseException:
            self._replace(worker)
            raise
        self._idle.put_nowait(worker)
        return answer

    def _replace(self, worker: _Worker) -> None:
        worker.kill()
        self._workers.discard(worker)
        self._dying.add(worker)
        if self._closed:
            return
        task = asyncio.get_running_loop().create_task(self._respawn(worker))
        self._spawning.add(task)
        task.add_done_callback(self._spawning.discard)

    async def _respawn(self, dead: _Worker) -> None:
        await dead.wait()
        self._dying.discard(dead)
        delay = 0.05
        while not self._closed:
            try:
                worker = await _Worker.spawn(self._load, timeout_s=self.load_timeout_s,
                                             memory_mb=self.memory_mb)
            except (ConfigError, OSError, TimeoutError) as e:
                log.error("cannot start a policy evaluator (retrying in %.1f s): %s", delay, e)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            if self._closed:
                worker.kill()
                return
            self._workers.add(worker)
            self._idle.put_nowait(worker)
            return

    @property
    def idle(self) -> int:
        return self._idle.qsize()

    async def close(self, grace_s: float = 0.0) -> None:
        """Stop taking work; after ``grace_s`` (in-flight evaluations may finish) kill all."""
        self._closed = True
        if grace_s > 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace_s):
                    while self._idle.qsize() < len(self._workers):
                        await asyncio.sleep(0.01)
        for task in list(self._spawning):
            task.cancel()
        for worker in list(self._workers):
            worker.kill()
        await asyncio.gather(*(w.wait() for w in (*self._workers, *self._dying)),
                             return_exceptions=True)
        await asyncio.gather(*self._spawning, return_exceptions=True)
        self._workers.clear()
        self._dying.clear()
