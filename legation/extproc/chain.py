"""A route's filters composed into one chain.

The chain is built once, when the configuration is loaded: for every phase it keeps only the hooks
that filters define, in declaration order, so a request pays for nothing it does not use. Running a
phase calls those hooks in order and stops at the first filter that answers (``ex.respond``).
The error guard (:mod:`legation.extproc.guard`) wraps the chain from outside, as starlette's
``ServerErrorMiddleware`` wraps the user's middleware: filters never see the guard.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode

from legation.extproc.errors import ExtProcError
from legation.extproc.exchange import Exchange
from legation.extproc.metrics import Metrics
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


@dataclass(frozen=True)
class _Step:
    name: str
    hook: Any
    is_async: bool


@dataclass(frozen=True, kw_only=True)
class Chain:
    """The filters of one route, in order, with the route's failure policy."""

    name: str
    filters: Sequence[FilterPlugin]
    fail_open: bool = False
    """On a filter error or a timeout, let the request through unchanged instead of a 500."""
    message_timeout: float | None = None
    """Seconds one phase may take here; None uses the service's setting."""
    _steps: dict[Phase, tuple[_Step, ...]] = field(init=False, repr=False, compare=False)
    _async: dict[Phase, bool] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        steps: dict[Phase, tuple[_Step, ...]] = {}
        for phase in Phase:
            found = []
            for f in self.filters:
                hook = getattr(f, phase.hook, None)
                if hook is not None:
                    found.append(_Step(f.name, hook, inspect.iscoroutinefunction(hook)))
            steps[phase] = tuple(found)
        object.__setattr__(self, "_steps", steps)
        has_async = {p: any(s.is_async for s in v) for p, v in steps.items()}
        object.__setattr__(self, "_async", has_async)

    @property
    def phases(self) -> frozenset[Phase]:
        """Every phase some filter declares."""
        out: frozenset[Phase] = frozenset()
        for f in self.filters:
            out |= f.phases
        return out

    def has_async(self, phase: Phase) -> bool:
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

    async def run(self, phase: Phase, ex: Exchange, metrics: Metrics) -> None:
        """Call the phase's hooks in order until one answers; a raise becomes FilterFailed."""
        pv = phase.value
        for step in self._steps[phase]:
            ex.current_filter = step.name
            start = time.perf_counter()
            try:
                result = step.hook(ex)
                if result is not None:
                    await result
            except Exception as exc:
                raise FilterFailed(step.name, phase, exc) from exc
            finally:
                metrics.observe(step.name, pv, time.perf_counter() - start)
            if ex.immediate is not None:
                return
