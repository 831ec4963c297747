"""The error guard: the fixed outer layer around every chain.

It is the one place where failures become answers: a filter that raises or outlives the
phase deadline (:func:`phase_deadline`: 80% of Envoy's ``message_timeout``, so the guard answers
before Envoy gives up) gives the client a clean 500 (no internals in the body) and one log line, or,
on a route configured fail-open, lets the message through unchanged (a threaded hook that outlived
the deadline also ends the stream after that answer, see :mod:`.chain`). Either way a metric
counts it under the filter's name and a stable code.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence

from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from legation.extproc import _wire
from legation.extproc.chain import Chain, FilterFailed
from legation.extproc.exchange import Exchange
from legation.extproc.metrics import Metrics
from legation.extproc.sdk import Phase

log = logging.getLogger("legation.extproc")

DEADLINE_SHARE = 0.8
"""The service's own deadline for a phase, as a share of Envoy's ``message_timeout``.

Envoy gives up on an answer after its ``message_timeout`` and answers 504 itself; the guard must
answer first, so that the client sees the chain's failure behaviour (500, or the request passed
through on a fail-open chain), every time, not whichever of two equal timers fires first. The
20% left (40 ms of the default 200 ms) covers the message's trip to the service, the answer's
trip back and a busy event loop. It is a margin, not a guarantee: a message that spends longer
than that between Envoy and the guard (the first on a new connection to the service, a process
stalled that long) still meets Envoy's 504."""


def phase_deadline(envoy_message_timeout: float, chain_timeout: float | None = None) -> float:
    """Seconds the guard lets one phase run: the chain's own ``message_timeout`` when it sets one
    (an explicit override: keep it below Envoy's, or Envoy's 504 wins), else
    :data:`DEADLINE_SHARE` of Envoy's ``message_timeout``."""
    return chain_timeout if chain_timeout else DEADLINE_SHARE * envoy_message_timeout


class ErrorGuard:
    """Runs one phase of a chain and always returns a well-formed ProcessingResponse."""

    def __init__(self, chain: Chain, *, metrics: Metrics, message_timeout: float) -> None:
        """``message_timeout``: Envoy's (see :func:`phase_deadline`)."""
        self.chain = chain
        self._metrics = metrics
        self._timeout = phase_deadline(message_timeout, chain.message_timeout)
        self._mode = chain.processing_mode()
        self._recorders: dict[Phase, Callable[[tuple[Sequence[float], bool]], None]] = {}
        self.buffered = frozenset(
            phase
            for phase, mode in (
                (Phase.REQUEST_BODY, self._mode.request_body_mode),
                (Phase.RESPONSE_BODY, self._mode.response_body_mode),
            )
            if mode == ProcessingMode.BUFFERED
        )

    async def __call__(self, phase: Phase, ex: Exchange) -> pb.ProcessingResponse:
        chain = self.chain
        durations: list[float] = []
        try:
            if chain.has_async(phase):
                async with asyncio.timeout(self._timeout):
                    await chain.run(phase, ex, durations)
            else:  # inline hooks only: the deadline is checked after each
                await chain.run(phase, ex, durations, time.perf_counter() + self._timeout)
        except FilterFailed as exc:
            return self.failed(phase, ex, exc.filter_name, exc.code, str(exc), exc.__cause__)
        except TimeoutError:
            message = (
                f"filter {ex.current_filter!r} exceeded the phase deadline "
                f"{self._timeout:g}s in {phase.value}"
            )
            return self.failed(phase, ex, ex.current_filter, "message_timeout", message, None)
        finally:
            record = self._recorders.get(phase)
            if record is None:
                record = self._recorders[phase] = self._metrics.recorder(
                    chain.name, phase.value, chain.filter_names(phase)
                )
            # the stream (when new), the phase and each filter's time: one queued update
            record((durations, ex._opened))
            ex._opened = False
        if ex.immediate is not None:
            self._metrics.answered(chain.name, ex.immediate.status)
        return _wire.response(phase, ex, self._mode)

    def failed(
        self,
        phase: Phase,
        ex: Exchange,
        filter_name: str,
        code: str,
        message: str,
        cause: BaseException | None,
    ) -> pb.ProcessingResponse:
        """The chain's failure answer for ``phase`` (a clean 500, or the message passed through
        unchanged on a fail-open chain), logged and counted under ``filter_name`` and ``code``.
        The HTTP transport answers with it too when a filter asks for what it cannot carry."""
        self._metrics.error(filter_name, code)
        action = "passing through (fail-open)" if self.chain.fail_open else "answering 500"
        log.error(
            "chain %r: %s; %s",
            self.chain.name,
            message,
            action,
            exc_info=(type(cause), cause, cause.__traceback__) if cause is not None else None,
        )
        if self.chain.fail_open:
            return _wire.passthrough(phase)
        self._metrics.answered(self.chain.name, 500)
        return _wire.error_response(500, f"legation_{code}")
