"""ext_proc over HTTP, attacked directly: the server on a real socket, no Envoy in front.

Only Envoy should ever talk to it (mTLS in a mesh), but the server must still refuse whatever
else arrives with a well-formed answer and never let a request through by accident: what Envoy
would read as "continue" is only ever the chain's own decision.
"""

from __future__ import annotations

import base64
import http.client
import json
import socket
from collections.abc import Iterator
from typing import Any
from urllib.parse import unquote_to_bytes

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from legation.extproc.config import build_chains
from legation.extproc.exchange import Exchange
from legation.extproc.http_server import HttpSettings, chain_of, chain_path, serve_http
from legation.extproc.metrics import Metrics
from legation.extproc.processor import Processor
from legation.extproc.sdk import Filter, Phase
from legation.fastpath._http import Limits
from tests import loop

WEIRD = "we/ird %\r\nname"
STAMP = {"request": {"set": {"x-in": "1"}}, "response": {"set": {"x-out": "1"}}}
ROUTE = {
    "name": "header_route",
    "options": {
        "header": "x-legation-cohort",
        "default": "stable",
        "rules": [{"header": "x-beta", "present": True, "value": "canary"}],
    },
}


class WantsBody(Filter):
    """Asks for the request body from its headers hook: the stream's job, not HTTP's."""

    name = "t_wants_body"
    inline = True

    def on_request_headers(self, ex: Exchange) -> None:
        ex.want_body(Phase.REQUEST_BODY)


class _Factory:
    name = "t_wants_body"

    def validate(self, raw: Any) -> dict[str, Any]:
        return {}

    def create(self, config: Any) -> Filter:
        return WantsBody()


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[int, CollectorRegistry]]:
    from legation import plugins

    plugins.register("extproc.filter", _Factory())
    chains = build_chains(
        {
            "chains": {
                "route": {"filters": [ROUTE]},
                WEIRD: {"filters": [ROUTE]},
                "body": {"filters": [{"name": "t_wants_body"}]},
                "stamp": {"filters": [{"name": "headers", "options": STAMP}]},
                "rid": {"filters": [{"name": "request_id"}]},
                "body_open": {"fail_open": True, "filters": [{"name": "t_wants_body"}]},
            }
        }
    )
    registry = CollectorRegistry()
    processor = Processor(chains, metrics=Metrics(registry), message_timeout=1.0)
    thread = loop.LoopThread()
    limits = Limits(max_body_bytes=64 * 1024)
    listening = thread.run(serve_http(processor, HttpSettings(limits=limits)))
    try:
        yield listening.port, registry
    finally:
        thread.run(listening.close())
        thread.close()
        plugins.unregister("extproc.filter", "t_wants_body")


def headers_message(pairs: dict[str, str], phase: str = "request_headers") -> bytes:
    items = [
        {"key": k, "raw_value": base64.b64encode(v.encode()).decode()} for k, v in pairs.items()
    ]
    return json.dumps({phase: {"headers": {"headers": items}, "end_of_stream": True}}).encode()


def post(
    port: int,
    path: str,
    body: bytes,
    *,
    method: str = "POST",
    content_type: str | None = "application/json",
) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        headers = {"content-type": content_type} if content_type else {}
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, json.loads(data) if data else None
    finally:
        conn.close()


def immediate_status(answer: dict[str, Any]) -> str:
    return str(answer["immediate_response"]["status"]["code"])


def test_headers_message_is_answered_by_the_chain(server):
    port, _ = server
    status, answer = post(port, "/ext_proc/route", headers_message({"x-beta": "1"}))
    assert status == 200
    mutation = answer["request_headers"]["response"]["header_mutation"]["set_headers"][0]
    assert mutation["header"]["key"] == "x-legation-cohort"
    assert base64.b64decode(mutation["header"]["raw_value"]) == b"canary"
    assert answer["request_headers"]["response"]["clear_route_cache"] is True


def test_a_chain_name_with_slash_percent_and_crlf_round_trips_through_its_path(server):
    port, _ = server
    path = chain_path(WEIRD)
    assert "/" not in path.removeprefix("/ext_proc/") and "\r" not in path and " " not in path
    assert chain_of(path.encode()) == WEIRD
    status, answer = post(port, path, headers_message({}))
    assert status == 200 and "request_headers" in answer


@settings(max_examples=300, deadline=None)
@given(st.text(min_size=1, max_size=40))
def test_every_chain_name_has_a_one_segment_path_that_names_it(name):
    path = chain_path(name)
    assert path.isascii() and path.count("/") == 2 and "?" not in path and "#" not in path
    assert all(c.isprintable() and not c.isspace() for c in path)
    assert chain_of(path.encode()) == name


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=60))
def test_any_request_target_names_a_chain_or_none_never_raises(target):
    name = chain_of(b"/ext_proc/" + target)
    if name is not None:  # one segment, nothing after it, well-formed escapes only
        assert target and not set(target) & set(b"/?#")
        assert unquote_to_bytes(target).decode("utf-8") == name
        assert chain_of(chain_path(name).encode()) == name


@pytest.mark.parametrize(
    "target",
    [
        "/ext_proc/",
        "/other/route",
        "/ext_proc/route/more",
        "/ext_proc/route?x=1",
        "/ext_proc/ro%zzute",
        "/ext_proc/%ff%fe",
        "/ext_proc/we/ird",
    ],
)
def test_a_path_naming_no_chain_is_an_error_envoy_fails_on(server, target):
    port, _ = server
    status, answer = post(port, target, headers_message({}))
    assert status == 404 and answer == {"error": "not_a_chain_path"}


def test_raw_crlf_in_the_request_line_is_refused_by_the_parser(server):
    port, _ = server
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"POST /ext_proc/ro\r\nute HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n")
        data = sock.recv(4096)
    assert data.startswith(b"HTTP/1.1 400")


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b"{not json", "bad JSON"),
        (b"\xff\xfe", "not UTF-8"),
        (b"[1, 2]", "not an object"),
        (b'{"request_headers": {}, "nonsense": 1}', "an unknown field"),
        (b'{"request_headers": {"headers": {"headers": [{"key": "a", "bogus": "x"}]}}}', "unknown"),
        (b'{"request_headers": {}, "request_headers": {}}', "a duplicate key"),
        (b'{"request_headers": {"end_of_stream": "yes"}}', "a wrong type"),
        (b"[" * 5_000 + b"]" * 5_000, "nested too deep"),
    ],
)
def test_a_body_that_is_no_processing_request_is_an_error_envoy_fails_on(server, body, why):
    port, registry = server
    before = registry.get_sample_value(
        "legation_extproc_errors_total", {"filter": "-", "code": "malformed_request"}
    )
    status, answer = post(port, "/ext_proc/route", body)
    assert status == 400, why
    assert answer == {"error": "malformed_request"}
    after = registry.get_sample_value(
        "legation_extproc_errors_total", {"filter": "-", "code": "malformed_request"}
    )
    assert after == (before or 0) + 1


def test_a_huge_body_is_refused_before_it_is_read_whole(server):
    port, _ = server
    status, answer = post(port, "/ext_proc/route", b"[" + b"0," * 100_000 + b"0]")
    assert status == 413 and answer == {"error": "body_too_large"}


def test_other_methods_and_content_types_are_refused(server):
    port, _ = server
    assert post(port, "/ext_proc/route", b"", method="GET")[0] == 405
    # a browser's simple cross-site POST is text/plain: never processed
    assert post(port, "/ext_proc/route", headers_message({}), content_type="text/plain")[0] == 415
    assert post(port, "/ext_proc/route", headers_message({}), content_type=None)[0] == 415


def test_an_unknown_chain_is_an_immediate_500_whatever_the_failure_mode(server):
    port, registry = server
    status, answer = post(port, chain_path("nope\r\n"), headers_message({}))
    assert status == 200
    assert immediate_status(answer) == "InternalServerError"
    assert answer["immediate_response"]["details"] == "legation_unknown_chain"
    assert registry.get_sample_value(
        "legation_extproc_immediate_responses_total", {"chain": "-", "status": "500"}
    )


@pytest.mark.parametrize("phase", ["request_body", "response_headers", "request_trailers"])
def test_a_phase_other_than_request_headers_is_an_immediate_500(server, phase):
    port, _ = server
    body = json.dumps({phase: {}}).encode()
    status, answer = post(port, "/ext_proc/route", body)
    assert status == 200
    assert immediate_status(answer) == "InternalServerError"
    assert answer["immediate_response"]["details"] == "legation_phase_not_over_http"


def test_response_headers_are_served_only_where_every_response_hook_is_stateless(server):
    port, _ = server
    message = headers_message({":status": "200"}, phase="response_headers")
    status, answer = post(port, "/ext_proc/stamp", message)  # headers: stateless
    assert status == 200
    mutation = answer["response_headers"]["response"]["header_mutation"]["set_headers"]
    assert [m["header"]["key"] for m in mutation] == ["x-out"]
    status, answer = post(port, "/ext_proc/rid", message)  # request_id reads ex.state there
    assert status == 200 and immediate_status(answer) == "InternalServerError"
    assert answer["immediate_response"]["details"] == "legation_phase_not_over_http"


def test_a_message_with_no_phase_is_an_immediate_500(server):
    port, _ = server
    status, answer = post(port, "/ext_proc/route", b"{}")
    assert status == 200 and immediate_status(answer) == "InternalServerError"
    assert answer["immediate_response"]["details"] == "legation_malformed_request"


def test_a_filter_asking_for_a_body_gets_the_chains_failure_answer(server):
    port, registry = server
    status, answer = post(port, "/ext_proc/body", headers_message({}))
    assert status == 200 and immediate_status(answer) == "InternalServerError"
    assert "mode_override" not in answer
    assert registry.get_sample_value(
        "legation_extproc_errors_total", {"filter": "t_wants_body", "code": "body_over_http"}
    )
    status, answer = post(port, "/ext_proc/body_open", headers_message({}))
    assert status == 200 and answer == {"request_headers": {}}  # fail-open: passed unchanged


def test_pipelined_messages_are_answered_in_order(server):
    port, _ = server
    one = headers_message({"x-beta": "1"})
    two = headers_message({})
    request = b"POST /ext_proc/route HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
    wire = b"".join(request + b"content-length: %d\r\n\r\n%s" % (len(b), b) for b in (one, two))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(wire)
        data = b""
        while data.count(b"HTTP/1.1 200") < 2 or not data.endswith(b"}}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    first, second = data.split(b"HTTP/1.1 200")[1:]
    assert base64.b64encode(b"canary") in first and base64.b64encode(b"stable") in second


def test_refusals_are_all_counted_but_logged_once_a_second(server, caplog, monkeypatch):
    from legation.extproc import http_server

    port, registry = server
    monkeypatch.setattr(http_server, "_LOGGED", {})  # earlier tests' lines are not this one's

    def refused() -> float:
        labels = {"filter": "-", "code": "unknown_chain"}
        return registry.get_sample_value("legation_extproc_errors_total", labels) or 0.0

    before = refused()
    with caplog.at_level("ERROR", logger="legation.extproc"):
        for i in range(20):
            assert post(port, chain_path(f"nope-{i}"), headers_message({}))[0] == 200
    assert refused() == before + 20
    lines = [r for r in caplog.records if "unknown chain" in r.getMessage()]
    assert 1 <= len(lines) <= 3  # the run may straddle a second or two, never 20


def test_a_refused_body_logs_one_quoted_line_not_the_callers_newlines(server, caplog):
    """The parser's message quotes the caller's JSON key; a key holding a newline must not start
    a forged log line (attacker review)."""
    from legation.extproc import http_server

    http_server._LOGGED.clear()
    port, _ = server
    forged = "x\n2026-11-30 WARNING legation forged line"
    body = json.dumps({"request_headers": {}, forged: 1}).encode()
    with caplog.at_level("ERROR", logger="legation.extproc"):
        status, _ = post(port, "/ext_proc/route", body)
    assert status == 400
    lines = [r.getMessage() for r in caplog.records if "not a ProcessingRequest" in r.getMessage()]
    assert lines and all("\n" not in line for line in lines)
    assert "forged line" in lines[0]  # still said, escaped


def test_a_stream_is_counted_per_request_headers_post_only(server):
    """Over HTTP each message is its own POST: the request headers' POST counts the request's
    "stream" (as gRPC counts one per request), the response headers' POST does not."""
    port, registry = server

    def streams() -> float:
        return registry.get_sample_value("legation_extproc_streams_total", {"chain": "stamp"}) or 0

    before = streams()
    assert post(port, "/ext_proc/stamp", headers_message({":path": "/"}))[0] == 200
    assert streams() == before + 1
    message = headers_message({":status": "200"}, phase="response_headers")
    assert post(port, "/ext_proc/stamp", message)[0] == 200
    assert streams() == before + 1
