"""OTLP/gRPC clients for the receiver's attacker tests: plaintext, or mutual TLS with a given
certificate, exporting one span under a given service name."""

from __future__ import annotations

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

from legation.certs.spiffe import TRACING, service_name
from legation.certs.workload import WorkloadCert
from legation.tracing.otlp import EXPORT_METHOD, to_request
from tests.tracing.test_store import span

Request = trace_service_pb2.ExportTraceServiceRequest
Response = trace_service_pb2.ExportTraceServiceResponse


def export_one(
    port: int,
    trace: int,
    *,
    service: str,
    cert: WorkloadCert | None = None,
    trusted: bytes = b"",
) -> grpc.StatusCode:
    """Export span 0 of trace ``trace`` under ``service`` to ``127.0.0.1:port``: in plaintext
    without ``cert``, else over mTLS presenting it and trusting ``trusted`` (the receiver
    verified as ``legation-tracing``). The call's status code."""
    target = f"127.0.0.1:{port}"
    if cert is None:
        channel = grpc.insecure_channel(target)
    else:
        creds = grpc.ssl_channel_credentials(
            root_certificates=trusted, private_key=cert.key_pem, certificate_chain=cert.cert_pem
        )
        options = [("grpc.ssl_target_name_override", service_name(TRACING))]
        channel = grpc.secure_channel(target, creds, options=options)
    with channel:
        call = channel.unary_unary(
            EXPORT_METHOD,
            request_serializer=Request.SerializeToString,
            response_deserializer=Response.FromString,
        )
        try:
            call(to_request([span(trace, 0)], service=service), timeout=5)
        except grpc.RpcError as err:
            return err.code()  # type: ignore[no-any-return,attr-defined]
    return grpc.StatusCode.OK
