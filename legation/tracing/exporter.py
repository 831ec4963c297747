"""An OpenTelemetry SDK span exporter speaking OTLP/gRPC with xds-protos' messages.

The SDK's own OTLP exporter package brings a second copy of the ``opentelemetry.proto`` modules
xds-protos already installs (the same import path), so Legation converts the SDK's finished spans
itself (:func:`legation.tracing.otlp.to_request`) and calls ``TraceService/Export`` on a plain
gRPC channel. The SDK's batch processor calls :meth:`OtlpExporter.export` on its own thread.

With ``tls`` (the embedded receiver on mesh mTLS) the channel is mutual TLS with the service's
own certificate (the one it serves Envoy with: a :class:`~legation.grpc_server.ServerTls`, good
for client auth too), trusting the mesh's bundle, and the receiver must present the DNS name
``server_name`` (``legation-tracing``: only the control plane's certificate for the receiver
carries it; gRPC's Python client cannot match a URI SAN). The source is asked before every
export; a renewed certificate or bundle opens a new channel. No certificate: the export fails
(counted and logged like a collector that is away), it never falls back to plaintext.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.trace import StatusCode

from legation.grpc_server import ServerTls, TlsSource
from legation.tracing.otlp import EXPORT_METHOD, to_request
from legation.tracing.store import Scalar, Span

__all__ = ["OtlpExporter"]

log = logging.getLogger("legation.tracing")

_KINDS = {0: "internal", 1: "server", 2: "client", 3: "producer", 4: "consumer"}
_LOG_EVERY_S = 60.0


class OtlpExporter(SpanExporter):
    """Export finished SDK spans of ``service`` to the collector at ``host:port`` (mTLS with
    ``tls``, the receiver named ``server_name``)."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        service: str,
        timeout: float = 2.0,
        tls: TlsSource | None = None,
        server_name: str = "",
    ) -> None:
        self.target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.service = service
        self.timeout = timeout
        self.tls = tls
        self.server_name = server_name
        self._held: ServerTls | None = None
        self._channel: grpc.Channel | None = None
        self._export: grpc.UnaryUnaryMultiCallable | None = None
        if tls is None:
            self._open(grpc.insecure_channel(self.target))
        self.failures = 0
        self._logged = 0.0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        request = to_request(
            [_span(s) for s in spans if s.context is not None], service=self.service
        )
        try:
            self._call()(request, timeout=self.timeout)
        except (grpc.RpcError, _NoCertificate) as err:
            self.failures += 1
            now = time.monotonic()
            if now - self._logged > _LOG_EVERY_S:  # a collector that is away: say so, not often
                self._logged = now
                log.warning("tracing: cannot export spans (%s spans lost so far)", self.failures)
                log.debug("tracing: export failed: %s", err)
            return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def _call(self) -> grpc.UnaryUnaryMultiCallable:
        if self.tls is not None:
            current = self.tls()
            if current is None:
                raise _NoCertificate(f"{self.service}: no certificate to export over mTLS with")
            if current is not self._held:
                creds = grpc.ssl_channel_credentials(
                    root_certificates=current.client_ca_pem,
                    private_key=current.key_pem,
                    certificate_chain=current.cert_chain_pem,
                )
                options = [("grpc.ssl_target_name_override", self.server_name)]
                self._open(grpc.secure_channel(self.target, creds, options=options))
                self._held = current
        assert self._export is not None
        return self._export

    def _open(self, channel: grpc.Channel) -> None:
        if self._channel is not None:
            self._channel.close()
        self._channel = channel
        self._export = channel.unary_unary(
            EXPORT_METHOD,
            request_serializer=trace_service_pb2.ExportTraceServiceRequest.SerializeToString,
            response_deserializer=trace_service_pb2.ExportTraceServiceResponse.FromString,
        )

    def shutdown(self) -> None:
        if self._channel is not None:
            self._channel.close()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


class _NoCertificate(Exception):
    """The service holds no certificate (yet) to export with over mTLS."""


def _span(s: ReadableSpan) -> Span:
    ctx = s.context
    assert ctx is not None
    parent = s.parent
    attributes: dict[str, Scalar] = {}
    for key, value in (s.attributes or {}).items():
        if isinstance(value, str | bool | int | float):
            attributes[key] = value
    return Span(
        trace_id=f"{ctx.trace_id:032x}",
        span_id=f"{ctx.span_id:016x}",
        parent_id=f"{parent.span_id:016x}" if parent is not None else "",
        name=s.name,
        service="",
        kind=_KINDS.get(s.kind.value, "internal"),
        start_ns=s.start_time or 0,
        end_ns=s.end_time or s.start_time or 0,
        status="error" if s.status.status_code is StatusCode.ERROR else "",
        attributes=attributes,
    )
