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
from typing import Any

from legation.errors import ConfigError
from legation.extauthz._worker import (
    Data,
    EvaluationError,
    Modules,
    _Worker,
    load_line,
    parse_tests,
    validate,
)

__all__ = [
    "Data",
    "EvaluationError",
    "EvaluatorPool",
    "Modules",
    "load_line",
    "parse_result",
    "parse_tests",
    "validate",
]

log = logging.getLogger("legation.extauthz.evaluator")


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


class EvaluatorPool:
    """``size`` evaluator processes loaded with the same modules and data."""

    def __init__(
        self,
        modules: Modules,
        data: Data,
        *,
        size: int = 2,
        load_timeout_s: float = 10.0,
        memory_mb: int = 1024,
    ) -> None:
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
                started.append(
                    await _Worker.spawn(
                        self._load, timeout_s=self.load_timeout_s, memory_mb=self.memory_mb
                    )
                )
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
                worker = await _Worker.spawn(
                    self._load, timeout_s=self.load_timeout_s, memory_mb=self.memory_mb
                )
            except (ConfigError, OSError, TimeoutError) as e:
                log.error("cannot start a policy evaluator (retrying in %.1f s): %s", delay, e)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            if self._closed:  # closed while it loaded: stopped and awaited here, unused (its
                worker.kill()  # pipes closed even if close() cancels this wait)
                await worker.wait()
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
        await asyncio.gather(
            *(w.wait() for w in (*self._workers, *self._dying)), return_exceptions=True
        )
        await asyncio.gather(*self._spawning, return_exceptions=True)
        self._workers.clear()
        self._dying.clear()
