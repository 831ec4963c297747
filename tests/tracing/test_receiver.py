"""The embedded OTLP/gRPC receiver, called over real gRPC: what it keeps, what it refuses."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from legation.tracing.otlp import EXPORT_METHOD, to_request
from legation.tracing.receiver import TraceReceiver
from legation.tracing.store import MAX_ATTRIBUTES, MAX_VALUE, TraceStore
from tests.tracing.test_store import span

Request = trace_service_pb2.ExportTraceServiceRequest
Response = trace_service_pb2.ExportTraceServiceResponse


@pytest.fixture
async def receiver() -> AsyncIterator[TraceReceiver]:
    r = await TraceReceiver(TraceStore(max_traces=10, max_spans=3)).start()
    try:
        yield r
    finally:
        await r.stop(0)


async def export(r: TraceReceiver, request: Request) -> Response:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{r.port}") as channel:
        call = channel.unary_unary(
            EXPORT_METHOD,
            request_serializer=Request.SerializeToString,
            response_deserializer=Response.FromString,
        )
        response: Response = await call(request, timeout=5)
        return response


async def test_round_trip_keeps_ids_service_and_attributes(receiver: TraceReceiver) -> None:
    sent = [span(7, 0, route="r", decision="allow"), span(7, 1, 0)]
    await export(receiver, to_request(sent, service="legation-extauthz"))
    kept = receiver.store.trace(f"{7:032x}")
    assert kept is not None
    assert [(s.span_id, s.parent_id, s.service) for s in kept] == [
        (sent[0].span_id, "", "legation-extauthz"),
        (sent[1].span_id, sent[0].span_id, "legation-extauthz"),
    ]
    assert kept[0].attributes == {"route": "r", "decision": "allow"}


async def test_spans_past_a_full_trace_are_counted(receiver: TraceReceiver) -> None:
    await export(receiver, to_request([span(1, n) for n in range(5)], service="x"))
    assert receiver.store.stats()["dropped"] == 2


async def test_malformed_ids_are_skipped_and_values_clipped(receiver: TraceReceiver) -> None:
    request = to_request([span(3, 0)], service="s" * 1000)
    spans = request.resource_spans[0].instrumentation_library_spans[0].spans
    good = spans[0]
    for i in range(MAX_ATTRIBUTES + 10):
        good.attributes.add(key=f"k{i}").value.string_value = "v" * 10_000
    spans.add(trace_id=b"short", span_id=b"12345678", name="bad")
    spans.add(trace_id=b"t" * 16, span_id=b"", name="bad")
    await export(receiver, request)
    assert receiver.store.stats()["spans"] == 1
    (kept,) = receiver.store.trace(f"{3:032x}") or []
    assert len(kept.attributes) == MAX_ATTRIBUTES
    assert all(len(str(v)) <= MAX_VALUE for v in kept.attributes.values())
    assert len(kept.service) <= 128


async def test_garbage_bytes_are_refused_and_the_receiver_keeps_serving(
    receiver: TraceReceiver,
) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{receiver.port}") as channel:
        raw = channel.unary_unary(EXPORT_METHOD)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await raw(b"\xff\xff\xff\x0f garbage", timeout=5)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    await export(receiver, to_request([span(9, 0)], service="s"))
    assert receiver.store.trace(f"{9:032x}") is not None


def test_span_kinds_survive() -> None:
    request = to_request([span(1, 0)], service="s")
    assert request.resource_spans[0].instrumentation_library_spans[0].spans[0].kind == (
        trace_pb2.Span.SPAN_KIND_SERVER
    )
