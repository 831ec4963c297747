"""The waterfall `legation traces` prints, and the /traces document it reads."""

from __future__ import annotations

from typing import Any

import pytest

from legation.tracing.query import traces_document
from legation.tracing.store import TraceStore
from legation.tracing.waterfall import render
from tests.tracing.test_store import span


def doc(store: TraceStore, **query: str) -> tuple[int, dict[str, Any]]:
    return traces_document(store, query)


def test_children_are_indented_under_their_parents_with_bars_in_time() -> None:
    t = "ab" * 16
    spans = [
        {"trace_id": t, "span_id": "1", "parent_id": "", "name": "ingress", "service": "gw",
         "kind": "server", "start_ns": 0, "end_ns": 30_000_000, "status": "",
         "attributes": {"http.method": "GET", "http.url": "http://h/admin?token=x",
                        "http.status_code": "200", "route": "admin"}},
        {"trace_id": t, "span_id": "3", "parent_id": "2", "name": "check", "service": "authz",
         "kind": "server", "start_ns": 2_000_000, "end_ns": 4_000_000, "status": "error",
         "attributes": {"legation.decision": "error", "legation.policy": "p"}},
        {"trace_id": t, "span_id": "2", "parent_id": "1", "name": "call", "service": "gw",
         "kind": "client", "start_ns": 1_000_000, "end_ns": 5_000_000, "status": "",
         "attributes": {}},
        {"trace_id": t, "span_id": "9", "parent_id": "8", "name": "orphan", "service": "x",
         "kind": "server", "start_ns": 15_000_000, "end_ns": 30_000_000, "status": "",
         "attributes": {}},
    ]  # fmt: skip
    lines = render({"trace_id": t, "spans": spans}).splitlines()
    assert lines[0] == f"trace {t}  4 spans  30.0 ms  route admin"
    body = lines[2:]
    assert [line.split("|")[2].split()[0] for line in body] == ["gw:", "gw:", "authz:", "x:"]
    indent = [len(line.split("|")[2]) - len(line.split("|")[2].lstrip()) for line in body]
    assert indent == [2, 4, 6, 2]  # the orphan (parent not in the trace) is a root
    assert body[0].split("|")[1] == "#" * 30
    assert body[3].split("|")[1] == " " * 15 + "#" * 15
    assert "GET /admin 200 route=admin" in body[0] and "token" not in body[0]
    assert body[2].endswith("decision=error policy=p ERROR")


def test_a_parent_cycle_prints_each_span_once() -> None:
    t = "cd" * 16
    spans = [
        {"trace_id": t, "span_id": a, "parent_id": b, "name": a, "service": "s",
         "kind": "server", "start_ns": 0, "end_ns": 1, "status": "", "attributes": {}}
        for a, b in (("1", "2"), ("2", "1"))
    ]  # fmt: skip
    assert len(render({"trace_id": t, "spans": spans}).splitlines()) == 4


def test_traces_document_filters_and_refuses_bad_parameters() -> None:
    store = TraceStore(max_traces=10, max_spans=100)
    store.add([span(1, 0, route="a")])
    store.add([span(2, 0, route="b")])
    code, body = doc(store, route="a")
    assert code == 200 and [t["trace_id"][-1] for t in body["traces"]] == ["1"]
    assert doc(store, id=f"{2:032x}")[1]["traces"][0]["spans"][0]["attributes"] == {"route": "b"}
    assert doc(store, id=f"{3:032x}")[1]["traces"] == []
    assert body["stats"]["traces"] == 2


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ({"id": "xyz"}, "id: expected a trace id (32 hex digits)"),
        ({"limit": "0"}, "limit: expected 1 to 1000"),
        ({"limit": "-1"}, "limit: expected 1 to 1000"),
        ({"limit": "1e9"}, "limit: expected 1 to 1000"),
        ({"routes": "a"}, "unknown parameter 'routes' (allowed: id, limit, route)"),
    ],
)
def test_bad_queries_are_400(query: dict[str, str], message: str) -> None:
    code, body = traces_document(TraceStore(max_traces=1, max_spans=1), query)
    assert (code, body) == (400, {"error": message})


def test_no_embedded_receiver_is_404() -> None:
    assert traces_document(None, {})[0] == 404


def test_terminal_escapes_in_names_and_attributes_are_not_printed() -> None:
    """Anyone who reaches the receiver names spans: no escape sequence reaches the terminal."""
    t = "ef" * 16
    evil = "\x1b]0;pwned\x07\x1b[2J\r\nfake line\u202e"
    spans = [
        {"trace_id": t, "span_id": "1", "parent_id": "", "name": evil, "service": evil,
         "kind": "server", "start_ns": 0, "end_ns": 1, "status": "",
         "attributes": {"route": evil, "legation.policy": evil, "http.method": evil,
                        "http.url": f"http://h/{evil}", "http.status_code": evil}},
    ]  # fmt: skip
    out = render({"trace_id": t, "spans": spans})
    assert out.isprintable() or all(c.isprintable() or c == "\n" for c in out)
    assert "\x1b" not in out and "\r" not in out and "\u202e" not in out
    assert len(out.splitlines()) == 3  # the header, the column names, the one span
