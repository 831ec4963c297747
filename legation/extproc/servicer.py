"""``envoy.service.ext_proc.v3.ExternalProcessor/Process``: one bidirectional stream per request.

The servicer is a thin facade: it finds the route's chain from the stream's initial metadata,
creates the request's :class:`Exchange`, and for each message Envoy sends runs the chain's guard
and writes exactly one answer, in order. Malformed input (no phase set, an unknown chain) gets a
well-formed answer, never a crash of the stream.
"""

from __future__ import annotations

import logging
from typing import Any

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

from legation.extproc import _wire
from legation.extproc.config import CHAIN_METADATA_KEY, Chains
from legation.extproc.exchange import Exchange
from legation.extproc.guard import ErrorGuard
from legation.extproc.metrics import Metrics
from legation.extproc.sdk import Phase

log = logging.getLogger("legation.extproc")

_HEADERS = {Phase.REQUEST_HEADERS, Phase.RESPONSE_HEADERS}
_BODIES = {Phase.REQUEST_BODY, Phase.RESPONSE_BODY}


class ExtProcServicer(pb_grpc.ExternalProcessorServicer):
    def __init__(self, chains: Chains, *, metrics: Metrics, message_timeout: float) -> None:
        self._metrics = metrics
        self._guards = {
            name: ErrorGuard(chain, metrics=metrics, message_timeout=message_timeout)
            for name, chain in chains.chains.items()
        }
        self._default = chains.default

    def _guard_for(self, context: grpc.aio.ServicerContext) -> tuple[str | None, ErrorGuard | None]:
        name = None
        for key, value in context.invocation_metadata() or ():
            if key == CHAIN_METADATA_KEY:
                name = value if isinstance(value, str) else value.decode()
                break
        if not name:
            name = self._default
        return name, self._guards.get(name) if name else None

    async def Process(
        self, request_iterator: Any, context: grpc.aio.ServicerContext
    ) -> None:
        name, guard = self._guard_for(context)
        metrics = self._metrics
        if guard is None:
            metrics.error("-", "unknown_chain")
            log.error("ext_proc stream names unknown chain %r; answering 500", name)
            await self._refuse(context, name)
            return
        chain = guard.chain.name
        metrics.stream(chain)
        ex = Exchange(chain)
        ex.buffered.update(guard.buffered)
        while True:
            req = await context.read()
            if req is grpc.aio.EOF:
                return
            which = req.WhichOneof("request")
            phase = _wire.PHASES.get(which) if which else None
            if phase is None:
                metrics.error("-", "malformed_request")
                await context.write(_wire.error_response(500, "legation_malformed_request"))
                continue
            metrics.phase(chain, which)  # type: ignore[arg-type]
            ex.begin(phase)
            msg = getattr(req, which)
            if phase in _HEADERS:
                _wire.read_headers(msg.headers, ex.headers)
                ex.end_of_stream = msg.end_of_stream
            elif phase in _BODIES:
                ex.body = msg.body
                ex.end_of_stream = msg.end_of_stream
            else:
                ex.trailers = {}
                _wire.read_headers(msg.trailers, ex.trailers)
            await context.write(await guard(phase, ex))
            if ex.immediate is not None:
                return

    async def _refuse(self, context: grpc.aio.ServicerContext, name: str | None) -> None:
        req = await context.read()
        if req is grpc.aio.EOF:
            return
        self._metrics.answered(name or "-", 500)
        await context.write(_wire.error_response(500, "legation_unknown_chain"))


