"""Legation's spans: the traceparent parser (fuzzed), the attribute allow-list, export through
the SDK to a real receiver, and no SDK work when a request is not sampled."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from legation.config.tracing import Tracing
from legation.tracing import spans
from legation.tracing.receiver import TraceReceiver
from legation.tracing.spans import ATTRIBUTES, CallTracer, parse_traceparent
from legation.tracing.store import TraceStore
from tests.loop import LoopThread

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"


@pytest.mark.parametrize(
    ("value", "sampled"),
    [
        (f"00-{TRACE}-{PARENT}-01", True),
        (f"00-{TRACE}-{PARENT}-03", True),
        (f"00-{TRACE}-{PARENT}-00", False),
        (f"00-{TRACE}-{PARENT}-02", False),
        (f"01-{TRACE}-{PARENT}-01", False),  # another version: not ours to guess
        (f"00-{TRACE.upper()}-{PARENT}-01", False),  # W3C: lower case only
        (f"00-{'0' * 32}-{PARENT}-01", False),
        (f"00-{TRACE}-{'0' * 16}-01", False),
        (f"00-{TRACE}-{PARENT}-01 ", False),
        (f"00-0x{TRACE[2:]}-{PARENT}-01", False),
        (f"00-{TRACE[:-1]}_-{PARENT}-01", False),
        ("", False),
        (None, False),
    ],
)
def test_traceparent(value: str | None, sampled: bool) -> None:
    ctx = parse_traceparent(value)
    assert (ctx is not None) == sampled
    if ctx is not None:
        assert (f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}") == (TRACE, PARENT)
        assert ctx.is_remote and ctx.trace_flags.sampled


@given(st.text(max_size=80))
def test_any_header_value_parses_or_is_none(value: str) -> None:
    ctx = parse_traceparent(value)
    if ctx is not None:
        assert value == f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{value[-2:]}"


@pytest.fixture
def collector() -> Iterator[TraceReceiver]:
    loop = LoopThread()
    receiver = loop.run(TraceReceiver(TraceStore(max_traces=10, max_spans=100)).start())
    spans.configure(Tracing(collector=f"127.0.0.1:{receiver.port}"))
    try:
        yield receiver
    finally:
        spans.configure(None)
        loop.run(receiver.stop(0))
        loop.close()


def test_a_sampled_call_is_exported_with_only_allowed_attributes(
    collector: TraceReceiver,
) -> None:
    tracer = CallTracer("extauthz")
    parent = tracer.parent(f"00-{TRACE}-{PARENT}-01")
    assert parent is not None
    now = time.time_ns()
    tracer.record(
        "legation.extauthz check",
        parent,
        start_ns=now - 1_000_000,
        end_ns=now,
        attributes={
            "legation.decision": "deny",
            "legation.policy": "p" * 1000,
            "legation.code": None,
            "authorization": "Bearer secret",  # not on the allow-list: dropped
            "http.request.header.cookie": "c=1",
        },
        error=True,
    )
    deadline = time.monotonic() + 10
    while collector.store.trace(TRACE) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    (span,) = collector.store.trace(TRACE) or []
    assert (span.parent_id, span.service, span.kind, span.status) == (
        PARENT,
        "legation-extauthz",
        "server",
        "error",
    )
    assert set(span.attributes) == {"legation.decision", "legation.policy"}
    assert len(str(span.attributes["legation.policy"])) <= 256
    assert 900_000 <= span.end_ns - span.start_ns <= 1_100_000


def test_off_and_unsampled_make_no_span() -> None:
    tracer = CallTracer("ratelimit")
    spans.configure(None)
    assert not tracer.on
    assert tracer.parent(f"00-{TRACE}-{PARENT}-01") is None
    assert tracer.parent_in([("traceparent", f"00-{TRACE}-{PARENT}-01")]) is None
    spans.configure(Tracing(collector="127.0.0.1:9"))
    try:
        assert tracer.on
        assert tracer.parent_in([("x", "y"), ("traceparent", f"00-{TRACE}-{PARENT}-00")]) is None
        assert tracer.parent_in([("traceparent", f"00-{TRACE}-{PARENT}-01")]) is not None
        assert tracer.parent_in(None) is None
    finally:
        spans.configure(None)


def test_the_allow_list_names_no_request_data() -> None:
    for key in ATTRIBUTES:
        assert key.startswith("legation.")
        assert not any(w in key for w in ("header", "token", "cookie", "auth", "value", "path"))
