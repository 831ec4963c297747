"""Failures through the real Envoy: raising filters, slow filters, the processor down."""

from __future__ import annotations

import time
import uuid

import pytest

from tests.extproc.filters_for_tests import Slow

pytestmark = pytest.mark.integration


def _unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex}"


def test_raising_filter_gives_a_clean_500_and_a_log_line(any_stack, caplog):
    before = any_stack.metric(
        "legation_extproc_errors_total", filter="t_raise", code="filter_raised"
    )
    path = _unique("/raise/")
    with caplog.at_level("ERROR", logger="legation.extproc"):
        r = any_stack.get(path)
    assert r.status == 500
    assert b"boom" not in r.body and b"Traceback" not in r.body
    assert path not in any_stack.stable.paths
    assert (
        any_stack.metric("legation_extproc_errors_total", filter="t_raise", code="filter_raised")
        == before + 1
    )
    assert any(
        "t_raise" in rec.getMessage() and "500" in rec.getMessage() for rec in caplog.records
    )


def test_raising_filter_on_fail_open_route_passes_through(any_stack):
    path = _unique("/raise-open/")
    r = any_stack.get(path)
    assert r.status == 200
    assert r.json()["path"] == path


def test_filter_slower_than_the_service_timeout_is_cancelled(any_stack):
    before = Slow.cancelled
    errors = any_stack.metric(
        "legation_extproc_errors_total", filter="t_slow", code="message_timeout"
    )
    r = any_stack.get(_unique("/slow/"))
    assert r.status == 500
    assert Slow.cancelled == before + 1
    assert (
        any_stack.metric("legation_extproc_errors_total", filter="t_slow", code="message_timeout")
        == errors + 1
    )
    path = _unique("/slow-open/")
    r = any_stack.get(path)
    assert r.status == 200 and r.json()["path"] == path


def _wait_for(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def test_envoy_message_timeout_is_honoured(any_stack):
    """The chain allows 20 s but Envoy's message_timeout is 1 s: Envoy answers 504, the stream
    closes and the still-running filter is cancelled (no work left behind)."""
    timeouts = any_stack.envoy.stats("ext_proc")["http.ingress.ext_proc.message_timeouts"]
    before = Slow.cancelled
    path = _unique("/slow-envoy/")
    r = any_stack.get(path)
    assert r.status == 504
    assert path not in any_stack.stable.paths
    assert (
        any_stack.envoy.stats("ext_proc")["http.ingress.ext_proc.message_timeouts"] == timeouts + 1
    )
    assert _wait_for(lambda: Slow.cancelled == before + 1)
    path = _unique("/slow-envoy-open/")
    r = any_stack.get(path)
    assert r.status == 200 and r.json()["path"] == path


def test_processor_down_fails_closed_or_open_as_configured(any_stack):
    failed = any_stack.envoy.stats("ext_proc").get(any_stack.failed_calls, 0)
    path = _unique("/down/")
    r = any_stack.get(path)
    assert r.status == 500
    assert path not in any_stack.stable.paths
    open_path = _unique("/down-open/")
    r = any_stack.get(open_path)
    assert r.status == 200 and r.json()["path"] == open_path
    assert any_stack.envoy.stats("ext_proc").get(any_stack.failed_calls, 0) == failed + 2


def test_unknown_chain_is_refused_cleanly(any_stack):
    before = any_stack.metric("legation_extproc_errors_total", filter="-", code="unknown_chain")
    r = any_stack.get(_unique("/unknown/"))
    assert r.status == 500
    assert (
        any_stack.metric("legation_extproc_errors_total", filter="-", code="unknown_chain")
        == before + 1
    )
