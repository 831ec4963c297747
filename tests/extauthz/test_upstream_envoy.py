"""opa-envoy-plugin's result mutations applied by a real Envoy (gRPC ext_authz only):
``query_parameters_to_set`` / ``query_parameters_to_remove`` (internal_test
``TestCheckAllowObjectDecisionReqQueryParams*``), multi-valued ``headers`` and several
``Set-Cookie`` in ``response_headers_to_add`` and in a denial (response.go's list-of-objects
shape). The upstream here records the full request target, which the demo app does not echo."""

from __future__ import annotations

import http.client
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from legation.envoy_process import EnvoyProcess
from legation.extauthz.service import Settings
from tests.conftest import free_port
from tests.extauthz.conftest import Route, ServiceThread, bootstrap

pytestmark = pytest.mark.integration

POLICY = """package demo.mutate
import rego.v1

default allow := {"allowed": false, "http_status": 401, "body": "who?",
                  "headers": [{"set-cookie": "a=1"}, {"set-cookie": "b=2"}]}

allow := {
    "allowed": true,
    "query_parameters_to_set": {"added": "1", "keep": "new"},
    "query_parameters_to_remove": ["secret"],
    "headers": {"x-user": ["alice", "bob"]},
    "response_headers_to_add": [{"set-cookie": "s=1"}, {"set-cookie": "t=2"}],
} if input.parsed_path[0] == "ok"
"""


class Echo(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        data = json.dumps(
            {"target": self.path, "x-user": self.headers.get_all("x-user") or []}
        ).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.send_header("set-cookie", "up=1")
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        return None


@pytest.fixture
def envoy_port(tmp_path: Path) -> Iterator[int]:
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "mutate.rego").write_text(POLICY)
    upstream = ThreadingHTTPServer(("127.0.0.1", 0), Echo)
    thread = threading.Thread(target=upstream.serve_forever, daemon=True)
    thread.start()
    service = ServiceThread(
        Settings(
            port=0,
            config={
                "checks": {
                    "authz": {
                        "type": "rego",
                        "options": {
                            "policy_dir": str(tmp_path / "policies"),
                            "reload_interval_s": 0,
                        },
                    }
                },
                "default_checks": ["authz"],
            },
            registry=CollectorRegistry(),
        )
    ).start()
    listen, admin = free_port(), free_port()
    envoy = EnvoyProcess(
        bootstrap(
            listen_port=listen,
            admin_port=admin,
            authz_port=service.port,
            upstream_port=upstream.server_address[1],
            routes=[Route("/", policy="demo.mutate")],
        ),
        admin_port=admin,
        name="envoy-upstream-compat",
        log_dir=tmp_path / "e",
    )
    try:
        envoy.start()
        envoy.wait_live()
        yield listen
    finally:
        envoy.stop()
        service.stop()
        upstream.shutdown()
        upstream.server_close()


def get(port: int, target: str, **headers: str) -> tuple[int, list[tuple[str, str]], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", target, headers=headers)
        resp = conn.getresponse()
        return resp.status, [(k.lower(), v) for k, v in resp.getheaders()], resp.read()
    finally:
        conn.close()


def test_query_and_header_mutations_reach_upstream_and_client(envoy_port: int) -> None:
    status, headers, body = get(
        envoy_port, "/ok?secret=s3&keep=old&other=z", **{"x-user": "mallory"}
    )
    assert status == 200
    seen = json.loads(body)
    path, _, query = seen["target"].partition("?")
    params = sorted(p.split("=", 1) for p in query.split("&"))
    assert path == "/ok"
    assert params == [["added", "1"], ["keep", "new"], ["other", "z"]]  # secret removed
    # the client's value replaced, both values kept (Envoy joins appended request values)
    assert [v for joined in seen["x-user"] for v in joined.split(",")] == ["alice", "bob"]
    cookies = [v for k, v in headers if k == "set-cookie"]
    assert sorted(cookies) == ["s=1", "t=2", "up=1"]  # appended to the upstream's own


def test_denial_carries_several_set_cookie(envoy_port: int) -> None:
    status, headers, body = get(envoy_port, "/no")
    assert status == 401 and body == b"who?"
    assert sorted(v for k, v in headers if k == "set-cookie") == ["a=1", "b=2"]
