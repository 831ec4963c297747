"""In-process tests: config errors (one fixture per error, message asserted), the input
document, result mapping, the Python check interface, the opa check against a stand-in, and
``legation policy test``."""

from __future__ import annotations

import asyncio
import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from envoy.service.auth.v3 import external_auth_pb2
from prometheus_client import CollectorRegistry

from legation import plugins
from legation.errors import ConfigError
from legation.extauthz import policy_test
from legation.extauthz.checks import Decision, PythonCheck
from legation.extauthz.config import load_file, load_mapping
from legation.extauthz.errors import AuthzError
from legation.extauthz.request import RequestContext, build_input
from legation.extauthz.response import decision_from_result, to_check_response
from legation.extauthz.service import Settings, build_servicer, close_checks
from tests.extauthz.conftest import REPO

BAD = Path(__file__).parent / "bad_configs"


@pytest.mark.parametrize(
    ("name", "message"),
    [
        (
            "missing_policy_dir.yaml",
            "checks.authz.options: policy_dir: /nonexistent is not a directory",
        ),
        ("alg_none.yaml", "checks.jwt.options: providers.0: Value error, algorithm 'none' is not"),
        ("alg_mix.yaml", "cannot mix HMAC (HS*) with public-key algorithms"),
        ("unknown_key.yaml", "default_check: Extra inputs are not permitted"),
        ("unknown_plugin.yaml", "checks.x.type: unknown extauthz.check plugin 'nosuch'"),
        ("unknown_default.yaml", "default_checks.0: no check named 'ghost'"),
        (
            "no_audiences.yaml",
            "providers.0: Value error, audiences is required: the 'aud' values "
            "this provider accepts, or 'any' to accept tokens for any audience",
        ),
        ("empty_audiences.yaml", "providers.0: Value error, audiences is required"),
        (
            "jwks_http_remote.yaml",
            "jwks_url 'http://issuer.test/jwks.json': http is allowed only "
            "to a loopback host; use https",
        ),
        (
            "jwks_http_loopback.yaml",
            "jwks_url 'http://127.0.0.1:9/jwks.json': http needs "
            "allow_insecure_http: true (loopback only); use https",
        ),
        ("jwks_file_url.yaml", "jwks_url 'file:///etc/passwd': only https URLs are allowed"),
        (
            "refetch_zero.yaml",
            "providers.0.jwks_min_refetch_s: Input should be greater than or equal to 1",
        ),
        (
            "claim_header_crlf.yaml",
            "providers.0.claims_to_headers: Value error, claim 'sub': "
            "'x-sub\\r\\nx-admin: 1' cannot be a request header name (not an RFC 9110 token)",
        ),
        ("claim_header_host.yaml", "claim 'sub': 'host' cannot be a request header name"),
    ],
)
def test_bad_configs_name_file_and_field(name: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_file(BAD / name)
    assert str(err.value).startswith(str(BAD / name) + ": ")
    assert message in str(err.value)


def request(
    path: str = "/a/b?x=1&x=2&y=",
    *,
    body: str = "",
    ctype: str = "",
    length: int | None = None,
    principal: str = "",
) -> external_auth_pb2.CheckRequest:
    r = external_auth_pb2.CheckRequest()
    h = r.attributes.request.http
    h.method, h.path, h.host, h.body = "POST", path, "svc", body
    h.headers["content-type"] = ctype
    if length is not None:
        h.headers["content-length"] = str(length)
    r.attributes.source.address.socket_address.address = "127.0.0.1"
    r.attributes.source.address.socket_address.port_value = 5555
    r.attributes.source.principal = principal
    r.attributes.context_extensions["policy"] = "p"
    return r


def test_input_document_matches_opa_envoy_plugin() -> None:
    doc = build_input(request(body='{"k": [1]}', ctype="application/json", length=10))
    assert doc["parsed_path"] == ["a", "b"]
    assert doc["parsed_query"] == {"x": ["1", "2"], "y": [""]}
    assert doc["parsed_body"] == {"k": [1]}
    assert doc["truncated_body"] is False
    assert doc["attributes"]["source"]["address"]["socketAddress"]["portValue"] == 5555
    assert doc["attributes"]["contextExtensions"] == {"policy": "p"}
    assert doc["attributes"]["request"]["http"]["host"] == "svc"
    assert doc["version"] == {"ext_authz": "v3", "encoding": "protojson"}
    truncated = build_input(request(body='{"k"', ctype="application/json", length=999))
    # as opa-envoy-plugin: a body that is not parsed is null, not absent
    assert truncated["truncated_body"] is True and truncated["parsed_body"] is None
    form = build_input(request(body="a=1&a=2", ctype="application/x-www-form-urlencoded"))
    assert form["parsed_body"] == {"a": ["1", "2"]}
    assert build_input(request("/"))["parsed_path"] == [""]


def test_malformed_body_is_a_coded_error() -> None:
    with pytest.raises(AuthzError) as err:
        build_input(request(body="{nope", ctype="application/json"))
    assert err.value.code == "malformed_body" and err.value.status == 400


def test_spiffe_id_and_claims_in_input() -> None:
    ctx = RequestContext(request(principal="spiffe://mesh.local/ns/default/sa/web"))
    ctx.claims, ctx.jwt_provider = {"sub": "x"}, "p"
    doc = ctx.input()
    assert doc["spiffe_id"] == "spiffe://mesh.local/ns/default/sa/web"
    assert doc["jwt"] == {"provider": "p", "claims": {"sub": "x"}}
    assert "spiffe_id" not in RequestContext(request(principal="CN=x")).input()


def test_result_mapping() -> None:
    assert decision_from_result(True, where="p").allowed
    assert not decision_from_result(None, where="p").allowed  # undefined denies
    d = decision_from_result(
        {"allowed": False, "http_status": 401, "body": "no", "headers": {"a": ["1", "2"]}},
        where="p",
    )
    resp = to_check_response(d, decision_id="id1", deny_status=403)
    assert resp.denied_response.status.code == 401
    assert resp.denied_response.body == "no"
    # one header entry per value, as opa-envoy-plugin (never joined: Set-Cookie)
    assert [h.header.value for h in resp.denied_response.headers] == ["1", "2"]
    assert resp.dynamic_metadata["decision_id"] == "id1"
    for bad in (
        {"allowed": "yes"},
        {"allowed": True, "http_status": 999},
        [1],
        {"allowed": True, "headers": {"a": 1}},
    ):
        with pytest.raises(AuthzError) as err:
            decision_from_result(bad, where="p")
        assert err.value.code == "invalid_policy_result"


class TeapotCheck(PythonCheck):
    name = "teapot"

    async def check(self, ctx: RequestContext) -> Decision:
        if ctx.headers.get("x-tea") == "yes":
            return Decision(allowed=True, headers={"x-brewed": "1"})
        if ctx.headers.get("x-boom"):
            raise RuntimeError("bug in a user check")
        return Decision(allowed=False, http_status=429, body="busy")


class TeapotFactory:
    name = "teapot"

    def validate(self, raw: Any) -> dict[str, Any]:
        return dict(raw)

    def create(self, config: dict[str, Any]) -> TeapotCheck:
        return TeapotCheck()


async def test_python_check_chain_and_fail_closed() -> None:
    plugins.register("extauthz.check", TeapotFactory())
    try:
        servicer = await build_servicer(
            Settings(
                config={
                    "checks": {"tea": {"type": "teapot"}},
                    "default_checks": ["tea"],
                    "error_status": 503,
                },
                registry=CollectorRegistry(),
            )
        )
        r = request()
        r.attributes.request.http.headers["x-tea"] = "yes"
        ok = await servicer.Check(r, None)
        assert ok.status.code == 0 and ok.ok_response.headers[0].header.key == "x-brewed"
        denied = await servicer.Check(request(), None)
        assert denied.denied_response.status.code == 429
        boom = request()
        boom.attributes.request.http.headers["x-boom"] = "1"
        err = await servicer.Check(boom, None)
        assert err.denied_response.status.code == 503
        assert json.loads(err.denied_response.body) == {"error": "internal"}
        unknown = request()
        unknown.attributes.context_extensions["checks"] = "tea,ghost"
        unknown.attributes.request.http.headers["x-tea"] = "yes"
        assert (await servicer.Check(unknown, None)).denied_response.status.code == 503
        await close_checks(servicer)
    finally:
        plugins.unregister("extauthz.check", "teapot")


class FakeOpa:
    """Stands in for OPA, which cannot run on this machine: a loopback server speaking OPA's
    REST data API (POST /v1/data/<path> -> {"result": ...}) and evaluating a fixed rule."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                outer.paths.append(self.path)
                method = body["input"]["attributes"]["request"]["http"]["method"]
                reply: dict[str, Any] = {}
                if self.path == "/v1/data/opa/test/allow":
                    reply = {"result": {"allowed": method == "GET", "http_status": 423}}
                data = json.dumps(reply).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                return None

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


async def test_opa_check_against_rest_api_stand_in() -> None:
    from tests.conftest import free_port

    opa = FakeOpa()
    try:
        loaded = load_mapping({"checks": {"opa": {"type": "opa", "options": {"url": opa.url}}}})
        check = plugins.get("extauthz.check", "opa").create(loaded.check_configs["opa"][1])
        await check.start()
        get = request("/x")
        get.attributes.request.http.method = "GET"
        get.attributes.context_extensions["policy"] = "opa.test"
        assert (await check.check(RequestContext(get))).allowed
        post = request("/x")
        post.attributes.context_extensions["policy"] = "opa.test"
        d = await check.check(RequestContext(post))
        assert not d.allowed and d.http_status == 423
        undefined = request("/x")
        undefined.attributes.context_extensions["policy"] = "opa.nothing"
        assert not (await check.check(RequestContext(undefined))).allowed
        assert opa.paths[:2] == ["/v1/data/opa/test/allow"] * 2
        await check.close()
    finally:
        opa.close()
    down = plugins.get("extauthz.check", "opa")
    dead = down.create(down.validate({"url": f"http://127.0.0.1:{free_port()}"}))
    r = request("/x")
    r.attributes.context_extensions["policy"] = "opa.test"
    with pytest.raises(AuthzError) as err:
        await asyncio.wait_for(dead.check(RequestContext(r)), 10)
    assert err.value.code == "opa_unavailable"
    await dead.close()


def test_policy_test_cli_on_shipped_policies() -> None:
    out = io.StringIO()
    assert policy_test.run(REPO / "policies" / "envoy", verbose=True, out=out) == 0
    assert "data.envoy.authz.test_guest_can_list_people: PASS" in out.getvalue()
    assert "PASS: 8/8" in out.getvalue()


def test_policy_test_cli_reports_failures_and_compile_errors(tmp_path: Path) -> None:
    (tmp_path / "t.rego").write_text(
        "package t\nimport rego.v1\nx := 1\ntest_ok if x == 1\ntest_bad if x == 2\n"
    )
    out = io.StringIO()
    assert policy_test.run(tmp_path, verbose=False, out=out) == 2
    assert "data.t.test_bad: FAIL" in out.getvalue() and "test_ok" not in out.getvalue()
    assert "PASS: 1/2" in out.getvalue() and "FAIL: 1/2" in out.getvalue()
    (tmp_path / "t.rego").write_text("package t\ntest_x if { x == }\n")
    out = io.StringIO()
    assert policy_test.run(tmp_path, verbose=False, out=out) == 1
    assert "t.rego" in out.getvalue()
