"""The embedded OTLP/gRPC receiver: ``TraceService/Export`` into a :class:`TraceStore`.

``legation up`` (through the control plane, ``tracing: {collector: embedded}``) runs it on
``127.0.0.1:<tracing.port>``; every proxy's tracer and Legation's services export to it, and
the control plane's status server reads it (``/traces``) for ``legation traces``. It accepts
requests up to :data:`MAX_MESSAGE` bytes; one that does not parse is answered
``INVALID_ARGUMENT``; spans it could not keep (their trace full) are counted in the store's
``dropped`` (the OTLP messages of xds-protos predate ``partial_success``).
"""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

from legation.grpc_server import start_grpc_server
from legation.tracing.otlp import SERVICE, from_request
from legation.tracing.store import TraceStore

__all__ = ["MAX_MESSAGE", "TraceReceiver"]

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
