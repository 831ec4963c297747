"""Immediate answers, dynamic metadata, disabled routes and metrics, through the real Envoy."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.integration


def test_filter_can_deny_at_once(any_stack):
    metric = "legation_extproc_immediate_responses_total"
    before = any_stack.metric(metric, chain="answer", status="403")
    r = any_stack.get("/answer/deny-me", headers={"x-deny": "1"})
    assert r.status == 403
    assert r.body == b"denied by test\n"
    assert r.headers["x-denied-by"] == "t_answer"
    assert "/answer/deny-me" not in any_stack.stable.paths
    assert any_stack.metric(metric, chain="answer", status="403") == before + 1


def test_filter_can_redirect(any_stack):
    r = any_stack.get("/answer/x", headers={"x-redirect": "https://example.test/login"})
    assert r.status == 302
    assert r.headers["location"] == "https://example.test/login"


def test_filter_sets_dynamic_metadata(any_stack):
    r = any_stack.get("/answer/x")
    assert r.status == 200
    assert r.json()["headers"]["x-meta-flag"] == "on"


def _streams(stack) -> float:
    return sum(
        s.value
        for m in stack.registry.collect()
        if m.name == "legation_extproc_streams"
        for s in m.samples
        if s.name.endswith("_total")
    )


def test_route_without_chain_never_calls_the_service(stack):
    before = _streams(stack)
    r = stack.get("/native/x")
    assert r.status == 200 and r.json()["service"] == "stable"
    assert _streams(stack) == before
    stack.get("/headers/x")
    assert _streams(stack) == before + 1


def test_headers_only_route_is_one_message(stack):
    """header_route declares request headers only: one round trip per request."""

    def count(phase: str) -> float:
        return stack.metric("legation_extproc_phases_total", chain="route", phase=phase)

    before = {p: count(p) for p in ("request_headers", "response_headers", "request_body")}
    stack.get("/route/x", method="POST", body=b"payload")
    assert count("request_headers") == before["request_headers"] + 1
    assert count("response_headers") == before["response_headers"]
    assert count("request_body") == before["request_body"]
    assert (
        stack.registry.get_sample_value(
            "legation_extproc_filter_seconds_count",
            {"filter": "header_route", "phase": "request_headers"},
        )
        >= 1
    )
