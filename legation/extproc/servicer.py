"""``envoy.service.ext_proc.v3.ExternalProcessor/Process``: one bidirectional stream per request.

The servicer is a thin facade: it finds the route's chain from the stream's initial metadata,
creates the request's :class:`Exchange`, and for each message Envoy sends runs the per-message
core both transports share (:meth:`legation.extproc.processor.Processor.answer`: the chain's guard)
and writes exactly one answer, in order. Malformed input (no phase set, an unknown chain) gets a
well-formed answer, never a crash of the stream.

A stream on which Envoy sends nothing for ``stream_idle_timeout`` seconds (default 300, Envoy's
own default stream idle timeout) is ended with DEADLINE_EXCEEDED: whoever can open streams cannot
hold them, and their exchanges, forever. Between two messages of one request Envoy may wait for the
upstream (request headers, then response headers), so keep it above the routes' timeouts.

:meth:`ExtProcServicer.swap` replaces the chains and timeouts in place (a mesh reload): new
streams get the new chains, open ones finish on theirs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from typing import Any

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

from legation.extproc.config import CHAIN_METADATA_KEY, Chains
from legation.extproc.exchange import Exchange
from legation.extproc.guard import ErrorGuard
from legation.extproc.metrics import Metrics
from legation.extproc.processor import Processor
from legation.tracing.spans import CallTracer, SpanContext

log = logging.getLogger("legation.extproc")
TRACER = CallTracer("extproc")  # one span per stream, under the Envoy span that opened it

DEFAULT_STREAM_IDLE_TIMEOUT = 300.0


class ExtProcServicer(pb_grpc.ExternalProcessorServicer):
    def __init__(
        self,
        chains: Chains,
        *,
        metrics: Metrics,
        message_timeout: float,
        stream_idle_timeout: float = DEFAULT_STREAM_IDLE_TIMEOUT,
    ) -> None:
        self._metrics = metrics
        self._timers: dict[tuple[asyncio.AbstractEventLoop, float], _IdleTimers] = {}
        self.processor = Processor(chains, metrics=metrics, message_timeout=message_timeout)
        """The chains and the per-message core, shared with the HTTP transport."""
        self.swap(chains, message_timeout=message_timeout, stream_idle_timeout=stream_idle_timeout)

    def swap(
        self,
        chains: Chains,
        *,
        message_timeout: float,
        stream_idle_timeout: float = DEFAULT_STREAM_IDLE_TIMEOUT,
    ) -> None:
        """Serve ``chains`` from the next stream on. A stream already open keeps the chain (and
        the timeouts) it started with, so a reload never changes a request half-way."""
        if message_timeout <= 0 or stream_idle_timeout <= 0:
            raise ValueError("ext_proc timeouts must be positive")
        self._idle = stream_idle_timeout
        self.processor.swap(chains, message_timeout=message_timeout)

    def _idle_timers(self, loop: asyncio.AbstractEventLoop, idle: float) -> _IdleTimers:
        """The timers of the streams with ``idle`` on ``loop`` (made on first use; those with
        no stream left are dropped when a new one is made, so swaps cannot pile them up)."""
        self._timers = {k: t for k, t in self._timers.items() if t.streams or t.handle}
        timers = self._timers[loop, idle] = _IdleTimers(loop, idle)
        return timers

    def _guard_for(self, context: grpc.aio.ServicerContext) -> tuple[str | None, ErrorGuard | None]:
        name = None
        for key, value in context.invocation_metadata() or ():
            if key == CHAIN_METADATA_KEY:
                name = value if isinstance(value, str) else value.decode()
                break
        return name, self.processor.guard(name)

    async def Process(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        name, guard = self._guard_for(context)
        idle = self._idle  # this stream's, whatever a swap does meanwhile
        metrics = self._metrics
        if guard is None:
            metrics.error("-", "unknown_chain")
            log.error("ext_proc stream names unknown chain %r; answering 500", name)
            await self._refuse(context, name)
            return
        chain = guard.chain.name
        metrics.stream(chain)
        ex = Exchange(chain)
        if guard.buffered:
            ex.buffered.update(guard.buffered)
        loop = asyncio.get_running_loop()
        parent = TRACER.parent_in(context.invocation_metadata()) if TRACER.on else None
        start, messages = time.time_ns() if parent is not None else 0, 0
        try:
            async with asyncio.timeout(None) as deadline:
                timers = self._timers.get((loop, idle))
                if timers is None:
                    timers = self._idle_timers(loop, idle)
                streams = timers.streams
                streams[deadline] = now = loop.time()
                if timers.handle is None:
                    timers.arm(now + idle)
                try:
                    while await self._one(context, guard, ex, chain):
                        messages += 1
                        streams[deadline] = loop.time()  # active now: the last to expire
                        streams.move_to_end(deadline)
                finally:
                    streams.pop(deadline, None)  # gone already if its idle time ran out
        except TimeoutError:
            metrics.error("-", "stream_idle_timeout")
            log.warning("chain %r: ext_proc stream idle for %gs; ending it", chain, idle)
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "stream idle timeout")
        finally:
            if parent is not None:
                _trace_stream(parent, start, guard, ex, messages)

    async def _one(
        self, context: grpc.aio.ServicerContext, guard: ErrorGuard, ex: Exchange, chain: str
    ) -> bool:
        """Read and answer one message; False when the stream is over."""
        req = await context.read()
        if req is grpc.aio.EOF:
            return False
        await context.write(await self.processor.answer(guard, ex, req))
        # a threaded hook still running past its deadline may yet touch ex: end the stream
        return ex.immediate is None and not ex.detached

    async def _refuse(self, context: grpc.aio.ServicerContext, name: str | None) -> None:
        try:
            async with asyncio.timeout(self._idle):
                req = await context.read()
        except TimeoutError:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "stream idle timeout")
        if req is grpc.aio.EOF:
            return
        await context.write(self.processor.refuse_unknown())


class _IdleTimers:
    """The idle timers of the open streams with one ``idle`` on one loop, on one loop timer.

    A timer handle per stream (made, cancelled, left in the loop's heap) was a sixth of the
    servicer's own time per stream. Here a message only moves its stream's ``asyncio.timeout``
    to the end of :attr:`streams` with the time it arrived, so the first entry is always the
    stream idle the longest; the one timer fires when that one's ``idle`` is up, sets its
    ``asyncio.timeout`` to expire now (which ends the stream exactly as a timer of its own
    would), and re-arms itself for the next one."""

    __slots__ = ("handle", "idle", "loop", "streams")

    def __init__(self, loop: asyncio.AbstractEventLoop, idle: float) -> None:
        self.loop, self.idle = loop, idle
        self.streams: OrderedDict[asyncio.Timeout, float] = OrderedDict()  # -> last message
        self.handle: asyncio.TimerHandle | None = None

    def arm(self, when: float) -> None:
        self.handle = self.loop.call_at(when, self._fire)

    def _fire(self) -> None:
        self.handle = None
        streams = self.streams
        now = self.loop.time()
        while streams:
            deadline, last = next(iter(streams.items()))
            if now < last + self.idle:
                self.arm(last + self.idle)
                return
            del streams[deadline]
            if not deadline.expired():
                deadline.reschedule(now)


def _trace_stream(
    parent: SpanContext, start: int, guard: ErrorGuard, ex: Exchange, messages: int
) -> None:
    """The stream's span: its chain, the chain's filters, how many messages it answered and,
    when a filter answered the request itself, that status."""
    immediate = ex.immediate
    TRACER.record(
        "legation.extproc stream",
        parent,
        start_ns=start,
        end_ns=time.time_ns(),
        attributes={
            "legation.chain": guard.chain.name,
            "legation.filters": ",".join(f.name for f in guard.chain.filters),
            "legation.messages": messages,
            "legation.decision": f"immediate {immediate.status}" if immediate else "continue",
        },
        error=immediate is not None and immediate.status >= 500,
    )
