"""A route's filters composed into one chain.

The chain is built once, when the configuration is loaded: for every phase it keeps only the hooks
that filters define, in declaration order, so a request pays for nothing it does not use. Running a
phase calls those hooks in order and stops at the first filter that answers (``ex.respond``).
The error guard (:mod:`legation.extproc.guard`) wraps the chain from outside, as starlette's
``ServerErrorMiddleware`` wraps the user's middleware: filters never see the guard.

How a hook runs, so that the phase's deadline (80% of Envoy's ``message_timeout``) holds and one
filter cannot stall the other streams on the event loop:

* a coroutine hook runs on the loop; at the deadline it is cancelled;
* a plain-function hook runs on a worker thread (:mod:`._pool`) and is awaited until the
  deadline; at the deadline the guard answers without it (the thread finishes on its own, its
  late mutations are never sent: the stream is ended after the answer);
* a plain-function hook of a filter that declares ``inline = True`` runs on the loop, with no
  thread hop: only for hooks that never block and whose work is bounded by the message (the
  built-in filters). The deadline is checked after each such hook: a late one fails the phase.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode

from legation.extproc._pool import POOL
from legation.extproc.errors import ExtProcError
from legation.extproc.exchange import Exchange
from legation.extproc.sdk import BodyMode, FilterPlugin, Phase

_SEND = ProcessingMode.SEND
_SKIP = ProcessingMode.SKIP


class FilterFailed(ExtProcError):
    """A filter hook raised; carries the filter's name for the log line and the metric."""

    code = "filter_raised"

    def __init__(self, filter_name: str, phase: Phase, cause: BaseException) -> None:
        super().__init__(f"filter {filter_name!r} raised in {phase.value}: {cause!r}")
        self.filter_name = filter_name
        self.phase = phase


_ASYNC, _INLINE, _THREAD = "async", "inline", "thread"


@dataclass(frozen=True)
class _Step:
    name: str
    hook: Any
    mode: str  # _ASYNC, _INLINE or _THREAD


def _mode(f: FilterPlugin, hook: Any) -> str:
    if inspect.iscoroutinefunction(hook):
        return _ASYNC
    return _INLINE if getattr(f, "inline", False) is True else _THREAD


@dataclass(frozen=True, kw_only=True)
class Chain:
    """The filters of one route, in order, with the route's failure policy."""

    name: str
    filters: Sequence[FilterPlugin]
    fail_open: bool = False
    """On a filter error or a timeout, let the request through unchanged instead of a 500."""
    message_timeout: float | None = None
    """Seconds one phase may take here; None: 80% of Envoy's ``message_timeout`` (the service's
    setting). Set, it must stay below Envoy's, or Envoy's 504 answers before the chain's."""
    _steps: dict[Phase, tuple[_Step, ...]] = field(init=False, repr=False, compare=False)
    _async: dict[Phase, bool] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        steps: dict[Phase, tuple[_Step, ...]] = {}
        for phase in Phase:
            found = []
            for f in self.filters:
                hook = getattr(f, phase.hook, None)
                if hook is not None:
                    found.append(_Step(f.name, hook, _mode(f, hook)))
            steps[phase] = tuple(found)
        object.__setattr__(self, "_steps", steps)
        # a phase with a coroutine or threaded hook is awaited under a timer
        timed = {p: any(s.mode != _INLINE for s in v) for p, v in steps.items()}
        object.__setattr__(self, "_async", timed)

    @property
    def phases(self) -> frozenset[Phase]:
        """Every phase some filter declares."""
        out: frozenset[Phase] = frozenset()
        for f in self.filters:
            out |= f.phases
        return out

    def has_async(self, phase: Phase) -> bool:
        """True when some hook of ``phase`` is awaited (a coroutine, or a threaded function)."""
        return self._async[phase]

    def processing_mode(self) -> ProcessingMode:
        """Only the declared phases: every phase Envoy sends is a round trip to this service."""
        phases = self.phases
        mode = ProcessingMode(
            request_header_mode=_SEND if Phase.REQUEST_HEADERS in phases else _SKIP,
            response_header_mode=_SEND if Phase.RESPONSE_HEADERS in phases else _SKIP,
            request_trailer_mode=_SEND if Phase.REQUEST_TRAILERS in phases else _SKIP,
            response_trailer_mode=_SEND if Phase.RESPONSE_TRAILERS in phases else _SKIP,
        )
        for phase, attr in (
            (Phase.REQUEST_BODY, "request_body_mode"),
            (Phase.RESPONSE_BODY, "response_body_mode"),
        ):
            wanted = [f.body_mode for f in self.filters if phase in f.phases]
            if wanted:
                # One streamed filter forces streaming; buffered filters then see chunks too.
                streamed = BodyMode.STREAMED in wanted
                value = ProcessingMode.STREAMED if streamed else ProcessingMode.BUFFERED
                setattr(mode, attr, value)
        return mode

    def filter_names(self, phase: Phase) -> tuple[str, ...]:
        """The filters whose hooks ``phase`` runs, in order."""
        return tuple(step.name for step in self._steps[phase])

    async def run(
        self, phase: Phase, ex: Exchange, durations: list[float], deadline: float = float("inf")
    ) -> None:
        """Call the phase's hooks in order until one answers; a raise becomes FilterFailed.
        Each hook's time (seconds) is appended to ``durations``, also when it raised or ran
        out of time. ``deadline`` (``time.perf_counter()``) is checked after each inline hook:
        TimeoutError; the caller bounds the awaited hooks with a timer."""
        for step in self._steps[phase]:
            ex.current_filter = step.name
            start = time.perf_counter()
            try:
                if step.mode is _THREAD:
                    job = POOL.submit(step.hook, ex)
                    ex.detached = True
                    try:
                        result = await asyncio.wrap_future(job)
                    finally:  # cancelled at the deadline while running: it runs on, detached
                        ex.detached = not job.done()
                else:
                    result = step.hook(ex)
                if result is not None:
                    await result
            except Exception as exc:
                raise FilterFailed(step.name, phase, exc) from exc
            finally:
                end = time.perf_counter()
                durations.append(end - start)
            if step.mode is _INLINE and end > deadline:
                raise TimeoutError
            if ex.immediate is not None:
                return
