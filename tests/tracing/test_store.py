"""The embedded receiver's store: bounded in traces and spans, oldest evicted first."""

from __future__ import annotations

import pytest

from legation.tracing.store import Span, TraceStore


def span(trace: int, n: int, parent: int | None = None, **attrs: str) -> Span:
    return Span(
        trace_id=f"{trace:032x}",
        span_id=f"{n + 1:016x}",
        parent_id=f"{parent + 1:016x}" if parent is not None else "",
        name=f"s{n}",
        service="svc",
        kind="server",
        start_ns=n,
        end_ns=n + 1,
        attributes=dict(attrs),
    )


def test_keeps_the_newest_traces_up_to_max_traces() -> None:
    store = TraceStore(max_traces=3, max_spans=100)
    for t in range(1, 6):
        store.add([span(t, 0), span(t, 1, 0)])
    assert [spans[0].trace_id[-1] for spans in store.traces()] == ["3", "4", "5"]
    assert store.stats()["traces"] == 3 and store.stats()["spans"] == 6
    assert store.stats()["evicted_traces"] == 2
    assert store.trace(f"{1:032x}") is None


def test_span_cap_evicts_oldest_traces_and_caps_one_trace() -> None:
    store = TraceStore(max_traces=100, max_spans=4)
    store.add([span(1, 0), span(1, 1)])
    store.add([span(2, 0), span(2, 1), span(2, 2)])  # 5 spans: trace 1 goes
    assert [s[0].trace_id[-1] for s in store.traces()] == ["2"]
    dropped = store.add([span(2, n) for n in range(3, 8)])  # one trace past the cap
    assert dropped == 4
    assert len(store.trace(f"{2:032x}") or []) == 4
    assert store.stats() | {} == {
        "traces": 1,
        "spans": 4,
        "max_traces": 100,
        "max_spans": 4,
        "received": 10,
        "dropped": 4,
        "evicted_traces": 1,
    }


def test_filter_by_route_and_limit() -> None:
    store = TraceStore(max_traces=10, max_spans=100)
    store.add([span(1, 0, route="a")])
    store.add([span(2, 0, route="b"), span(2, 1, 0)])
    store.add([span(3, 0, route="a")])
    assert [s[0].trace_id[-1] for s in store.traces(route="a")] == ["1", "3"]
    assert [s[0].trace_id[-1] for s in store.traces(limit=1)] == ["3"]
    assert store.traces(route="nope") == []


def test_caps_must_be_positive() -> None:
    with pytest.raises(ValueError, match="must be >= 1"):
        TraceStore(max_traces=0, max_spans=1)
