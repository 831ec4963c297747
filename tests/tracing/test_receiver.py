"""The embedded OTLP/gRPC receiver, called over real gRPC: what it keeps, what it refuses."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from google.protobuf.message import DecodeError
from hypothesis import given
from hypothesis import strategies as st
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from legation.tracing.otlp import EXPORT_METHOD, from_request, to_request
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


_values = st.one_of(
    st.text(max_size=300).map(lambda v: common_pb2.AnyValue(string_value=v)),
    st.integers(min_value=-(2**63), max_value=2**63 - 1).map(
        lambda v: common_pb2.AnyValue(int_value=v)
    ),
    st.booleans().map(lambda v: common_pb2.AnyValue(bool_value=v)),
    st.floats(allow_nan=True).map(lambda v: common_pb2.AnyValue(double_value=v)),
    st.binary(max_size=20).map(lambda v: common_pb2.AnyValue(bytes_value=v)),
)


@st.composite
def requests(draw: st.DrawFn) -> Request:
    request = Request()
    for _ in range(draw(st.integers(0, 3))):
        rs = request.resource_spans.add()
        if draw(st.booleans()):
            kv = rs.resource.attributes.add(key="service.name")
            kv.value.CopyFrom(draw(_values))
        scope = rs.instrumentation_library_spans.add()
        for _ in range(draw(st.integers(0, 4))):
            s = scope.spans.add(
                trace_id=draw(st.binary(min_size=0, max_size=20)),
                span_id=draw(st.binary(min_size=0, max_size=10)),
                parent_span_id=draw(st.binary(max_size=10)),
                name=draw(st.text(max_size=300)),
                kind=draw(st.integers(0, 9)),
                start_time_unix_nano=draw(st.integers(0, 2**64 - 1)),
                end_time_unix_nano=draw(st.integers(0, 2**64 - 1)),
            )
            s.status.code = draw(st.integers(0, 5))
            for key in draw(st.lists(st.text(max_size=200), max_size=40)):
                s.attributes.add(key=key).value.CopyFrom(draw(_values))
    return request


@given(requests())
def test_any_export_request_gives_bounded_well_formed_spans(request: Request) -> None:
    for s in from_request(request):
        assert len(s.trace_id) == 32 and len(s.span_id) == 16
        assert s.parent_id == "" or len(s.parent_id) == 16
        assert len(s.name) <= 128 and len(s.service) <= 128
        assert len(s.attributes) <= MAX_ATTRIBUTES
        assert all(len(k) <= 128 for k in s.attributes)
        assert all(len(v) <= MAX_VALUE for v in s.attributes.values() if isinstance(v, str))
        assert s.end_ns >= s.start_ns


@given(st.binary(max_size=400))
def test_any_bytes_parse_or_are_refused(raw: bytes) -> None:
    try:
        request = Request.FromString(raw)
    except DecodeError:
        return
    list(from_request(request))  # never raises on what parsed


def test_the_query_string_of_a_url_is_not_kept() -> None:
    request = to_request([span(5, 0)], service="gw")
    s = request.resource_spans[0].instrumentation_library_spans[0].spans[0]
    s.attributes.add(key="http.url").value.string_value = "http://h/admin?access_token=SECRET"
    s.attributes.add(key="note").value.string_value = "a?b"  # other attributes as sent
    (kept,) = from_request(request)
    assert kept.attributes == {"http.url": "http://h/admin", "note": "a?b"}
