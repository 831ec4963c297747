"""``envoy.service.ext_proc.v3.ExternalProcessor/Process``: one bidirectional stream per request.

The servicer is a thin facade: it finds the route's chain from the stream's initial metadata,
creates the request's :class:`Exchange`, and for each message Envoy sends runs the per-message
core both transports share (:meth:`legation.extproc.processor.Processor.answer`: the chain's guard)
and writes exactly one answer, in order. Malformed input (no phase set, an unknown chain) gets a
well-formed answer, never a crash of the stream.

A stream on which Envoy sends nothing for ``stream_idle_timeout`` seconds (default 300, Envoy's
own default stream idle timeout; at most a quarter longer, see :class:`_IdleSweep`) is ended with
DEADLINE_EXCEEDED: whoever can open streams cannot hold them, and their exchanges, forever.
Between two messages of one request Envoy may wait for the upstream (request headers, then
response headers), so keep it above the routes' timeouts.

:meth:`ExtProcServicer.swap` replaces the chains and timeouts in place (a mesh reload): new
streams get the new chains, open ones finish on theirs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

from legation.extproc import _wire
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
        self._sweeps: dict[tuple[asyncio.AbstractEventLoop, float], _IdleSweep] = {}
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

    def _idle_sweep(self, loop: asyncio.AbstractEventLoop, idle: float) -> _IdleSweep:
        """The sweep of the streams with ``idle`` on ``loop`` (made on first use; those with
        no stream left are dropped when a new one is made, so swaps cannot pile them up)."""
        self._sweeps = {k: t for k, t in self._sweeps.items() if t.streams or t.handle}
        sweep = self._sweeps[loop, idle] = _IdleSweep(loop, idle)
        return sweep

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
        ex = Exchange(chain)
        ex._opened = True  # counted with its first message (or below, if it sends none)
        if guard.buffered:
            ex.buffered.update(guard.buffered)
        loop = asyncio.get_running_loop()
        parent = TRACER.parent_in(context.invocation_metadata()) if TRACER.on else None
        start = time.time_ns() if parent is not None else 0
        sweep = self._sweeps.get((loop, idle))
        if sweep is None:
            sweep = self._idle_sweep(loop, idle)
        stream = sweep.open()
        try:
            while await self._one(context, guard, ex, chain):
                stream.messages += 1
        except asyncio.CancelledError:
            sweep.streams.discard(stream)  # ending now: no further cancellation in the abort
            if not stream.cancels or _uncancel(stream.task, stream.cancels) > 0:
                raise  # not (only) the idle sweep's cancellation
            metrics.error("-", "stream_idle_timeout")
            log.warning("chain %r: ext_proc stream idle for %gs; ending it", chain, idle)
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "stream idle timeout")
        finally:
            sweep.streams.discard(stream)
            if ex._opened:  # no message reached the chain
                metrics.stream(chain)
            if parent is not None:
                _trace_stream(parent, start, guard, ex, stream.messages)

    async def _one(
        self, context: grpc.aio.ServicerContext, guard: ErrorGuard, ex: Exchange, chain: str
    ) -> bool:
        """Read and answer one message; False when the stream is over."""
        req = await context.read()
        if req is grpc.aio.EOF:
            return False
        answer = await self.processor.answer(guard, ex, req)
        await context.write(_wire.WIRE.get(id(answer), answer))
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


class _Stream:
    """One open stream, as the idle sweep sees it."""

    __slots__ = ("cancels", "messages", "quiet", "seen", "task")

    def __init__(self, task: asyncio.Task[Any]) -> None:
        self.task = task
        self.messages = 0  # answered so far
        self.seen = -1  # messages at the last sweep (-1: none yet, so that sweep counts)
        self.quiet = 0  # sweeps in a row that found no new message
        self.cancels = 0  # cancellations the sweep sent it


def _uncancel(task: asyncio.Task[Any], times: int) -> int:
    """Take back ``times`` cancellations of ``task``; how many others are left."""
    left = task.cancelling()
    for _ in range(times):
        left = task.uncancel()
    return left


class _IdleSweep:
    """The idle timeouts of the open streams with one ``idle`` on one loop, by one timer.

    A timer per stream, or an ``asyncio.timeout`` moved on every message, was a quarter of the
    servicer's own time per stream. Here a message only counts itself (``messages += 1``); a
    loop timer runs every ``idle / SWEEPS`` seconds while streams are open, and a stream that no
    sweep saw move for ``SWEEPS`` sweeps in a row is cancelled (its ``Process`` then ends it with
    DEADLINE_EXCEEDED, as an ``asyncio.timeout`` of its own would): a stream is ended after
    between ``idle`` and ``idle`` x (1 + 1/SWEEPS) seconds without a message, never sooner; a
    hook that swallows the cancellation gets another at each sweep until the stream ends. A
    sweep costs one step per open stream, every ``idle / SWEEPS``
    seconds (75 s by default)."""

    SWEEPS = 4
    __slots__ = ("handle", "idle", "loop", "streams")

    def __init__(self, loop: asyncio.AbstractEventLoop, idle: float) -> None:
        self.loop, self.idle = loop, idle
        self.streams: set[_Stream] = set()
        self.handle: asyncio.TimerHandle | None = None

    def open(self) -> _Stream:
        """The running task's stream, watched until its ``Process`` ends
        (``streams.discard``)."""
        task = asyncio.current_task()
        assert task is not None
        stream = _Stream(task)
        self.streams.add(stream)
        if self.handle is None:
            self.handle = self.loop.call_later(self.idle / self.SWEEPS, self._sweep)
        return stream

    def _sweep(self) -> None:
        self.handle = None
        for stream in list(self.streams):
            if stream.messages != stream.seen:
                stream.seen, stream.quiet = stream.messages, 0
                continue
            stream.quiet += 1
            if stream.quiet >= self.SWEEPS:  # again on every sweep, should a hook swallow it
                stream.cancels += 1
                stream.task.cancel()
        if self.streams:
            self.handle = self.loop.call_later(self.idle / self.SWEEPS, self._sweep)


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
