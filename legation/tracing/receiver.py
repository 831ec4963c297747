"""The embedded OTLP/gRPC receiver: ``TraceService/Export`` into a :class:`TraceStore`.

``legation up`` (through the control plane, ``tracing: {collector: embedded}``) runs it on
``127.0.0.1:<tracing.port>``; every proxy's tracer and Legation's services export to it, and
the control plane's status server reads it (``/traces``) for ``legation traces``. It accepts
requests up to :data:`MAX_MESSAGE` bytes; one that does not parse is answered
``INVALID_ARGUMENT``; spans it could not keep (their trace full) are counted in the store's
``dropped`` (the OTLP messages of xds-protos predate ``partial_success``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

from legation.grpc_server import start_grpc_server
from legation.tracing.otlp import SERVICE, from_request
from legation.tracing.store import TraceStore

if TYPE_CHECKING:
    from legation.config.tracing import Tracing

__all__ = ["MAX_MESSAGE", "EmbeddedCollector", "TraceReceiver"]

MAX_MESSAGE = 4 * 1024 * 1024


class TraceReceiver:
    """An OTLP/gRPC trace receiver on ``host:port`` (0: any free port) keeping spans in
    ``store``."""

    def __init__(self, store: TraceStore, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.store = store
        self.host = host
        self.port = port
        self._server: grpc.aio.Server | None = None

    async def start(self) -> TraceReceiver:
        self._server, self.port = await start_grpc_server(
            "tracing",
            self._register,
            host=self.host,
            port=self.port,
            options=[("grpc.max_receive_message_length", MAX_MESSAGE)],
        )
        return self

    async def stop(self, grace: float = 0.5) -> None:
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None

    def _register(self, server: grpc.aio.Server) -> None:
        handler = grpc.unary_unary_rpc_method_handler(
            self.export,
            response_serializer=trace_service_pb2.ExportTraceServiceResponse.SerializeToString,
        )
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE, {"Export": handler}),)
        )

    async def export(self, raw: bytes, context: Any) -> Any:
        try:
            request = trace_service_pb2.ExportTraceServiceRequest.FromString(raw)
        except DecodeError:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "not an ExportTraceServiceRequest"
            )
        self.store.add(list(from_request(request)))
        return trace_service_pb2.ExportTraceServiceResponse()


class EmbeddedCollector:
    """The receiver a mesh asks for (``tracing: {collector: embedded}``), following reloads:
    started when the block appears, moved when its port changes (the traces kept), its caps
    applied (the next span evicts down to them), stopped when the block goes or names another
    collector."""

    def __init__(self) -> None:
        self.receiver: TraceReceiver | None = None

    @property
    def store(self) -> TraceStore | None:
        return self.receiver.store if self.receiver is not None else None

    async def follow(self, tracing: Tracing | None) -> None:
        """Match ``tracing``; raises ``BindError`` (the old receiver kept) when its port
        cannot be bound."""
        if tracing is None or not tracing.embedded:
            await self.stop()
            return
        host, port = tracing.address()
        running = self.receiver
        if running is not None and running.port == port:
            running.store.max_traces, running.store.max_spans = tracing.trace_cap, tracing.span_cap
            return
        store = running.store if running is not None else None
        if store is None:
            store = TraceStore(max_traces=tracing.trace_cap, max_spans=tracing.span_cap)
        store.max_traces, store.max_spans = tracing.trace_cap, tracing.span_cap
        self.receiver = await TraceReceiver(store, host=host, port=port).start()
        if running is not None:
            await running.stop()

    async def stop(self) -> None:
        if self.receiver is not None:
            await self.receiver.stop()
            self.receiver = None
