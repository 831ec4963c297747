"""The threads synchronous filter hooks run on, so a hook that blocks cannot stall the event loop.

A small fixed pool of *daemon* threads (``concurrent.futures.ThreadPoolExecutor`` joins its workers
at interpreter exit, so one hook blocked forever would hang shutdown). The guard awaits each job
under the phase's deadline; a job still running at the deadline keeps its thread until it returns
(Python cannot kill a thread), so at most :data:`WORKERS` runaway hooks can be stuck at once, after
which further jobs wait in the queue and time out like any late hook: the service keeps answering,
failing closed (or open, as each chain says) instead of stalling.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

WORKERS = 16


class DaemonPool:
    def __init__(self, workers: int = WORKERS, name: str = "extproc-filter") -> None:
        self._jobs: queue.SimpleQueue[tuple[Future[Any], Callable[..., Any], tuple[Any, ...]]] = (
            queue.SimpleQueue()
        )
        self._workers = workers
        self._name = name
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def submit(self, fn: Callable[..., Any], /, *args: Any) -> Future[Any]:
        future: Future[Any] = Future()
        self._jobs.put((future, fn, args))
        if len(self._threads) < self._workers:
            self._start_all()
        return future

    def _start_all(self) -> None:
        with self._lock:
            while len(self._threads) < self._workers:
                t = threading.Thread(
                    target=self._work, daemon=True, name=f"{self._name}-{len(self._threads)}"
                )
                t.start()
                self._threads.append(t)

    def _work(self) -> None:
        while True:
            future, fn, args = self._jobs.get()
            if not future.set_running_or_notify_cancel():
                continue  # its deadline passed while it waited
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # handed to the awaiting guard
                future.set_exception(exc)


POOL = DaemonPool()
"""Shared by every chain of the process."""
