"""Attacks on the ``jwt`` check: identity spoofing through ``claims_to_headers``, header injection
through claim values, malformed token headers, and JWKS sources an attacker could steer.

The spoofing and injection cases go through a real Envoy to the demo upstream, which echoes the
headers it received: the assertion is on what the upstream saw.
"""

from __future__ import annotations

import base64
import http.client
import json
import logging
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from legation.errors import ConfigError
from legation.extauthz.errors import AuthzError
from legation.extauthz.jwks import KeySet
from legation.extauthz.jwt import JwtCheck, JwtCheckFactory
from legation.extauthz.request import RequestContext
from tests.extauthz.conftest import JwksServer, Route, Signer, Stack, StackPool
from tests.extauthz.test_units import request

ISSUER = "https://issuer.test"
OWNED = {"sub": "x-jwt-sub", "role": "x-jwt-role", "groups": "x-jwt-groups", "note": "x-jwt-note"}


@pytest.fixture(scope="module")
def signer() -> Signer:
    return Signer("k1")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: Any, signer: Signer) -> Iterator[Stack]:
    provider = {
        "name": "idp",
        "issuer": ISSUER,
        "audiences": ["api"],
        "jwks": {"keys": [signer.jwk]},
        "claims_to_headers": OWNED,
    }
    pool = StackPool(tmp_path_factory.mktemp("jwtsec"))
    try:
        yield pool.make(
            config={
                "checks": {"jwt": {"type": "jwt", "options": {"providers": [provider]}}},
                "default_checks": ["jwt"],
            },
            routes=[Route("/", checks=["jwt"])],
        )
    finally:
        pool.close()


def claims(**over: Any) -> dict[str, Any]:
    now = int(time.time())
    base = {"iss": ISSUER, "aud": "api", "sub": "alice", "iat": now, "exp": now + 300}
    return {k: v for k, v in {**base, **over}.items() if v is not None}


def send(port: int, path: str, headers: list[tuple[str, str]]) -> tuple[int, dict[str, Any]]:
    """One request with headers as a list: the same name may repeat, case is kept."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.putrequest("GET", path)
        for name, value in headers:
            conn.putheader(name, value)
        conn.endheaders()
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"{}")
    finally:
        conn.close()


@pytest.mark.integration
def test_absent_claim_header_sent_by_the_client_never_reaches_upstream(
    stack: Stack, signer: Signer
) -> None:
    token = signer.token(claims())  # no role, no groups, no note
    status, body = send(
        stack.client.port,
        "/spoof",
        [
            ("authorization", f"Bearer {token}"),
            ("x-jwt-role", "admin"),
            ("X-JWT-Role", "root"),
            ("x-jwt-groups", "wheel"),
            ("x-jwt-note", "trusted"),
        ],
    )
    assert status == 200, body
    seen = body["headers"]
    assert seen["x-jwt-sub"] == "alice"
    for header in ("x-jwt-role", "x-jwt-groups", "x-jwt-note"):
        assert header not in seen, (header, seen)


@pytest.mark.integration
def test_present_claim_overwrites_every_client_copy(stack: Stack, signer: Signer) -> None:
    token = signer.token(claims(role="viewer", groups=["a", "b"]))
    status, body = send(
        stack.client.port,
        "/overwrite",
        [
            ("authorization", f"Bearer {token}"),
            ("x-jwt-sub", "mallory"),
            ("x-jwt-sub", "root"),
            ("x-jwt-role", "admin"),
        ],
    )
    assert status == 200, body
    seen = body["headers"]
    assert seen["x-jwt-sub"] == "alice"
    assert seen["x-jwt-role"] == "viewer"
    assert seen["x-jwt-groups"] == '["a","b"]'


@pytest.mark.integration
@pytest.mark.parametrize("value", ["a\r\nx-admin: 1", "a\nx-admin: 1", "a\rb", "a\x00b", "a\x7fb"])
def test_claim_with_control_characters_is_denied(stack: Stack, signer: Signer, value: str) -> None:
    before = stack.upstream.requests
    token = signer.token(claims(note=value))
    status, body = send(stack.client.port, "/inject", [("authorization", f"Bearer {token}")])
    assert (status, body) == (401, {"error": "invalid_claim"})
    assert stack.upstream.requests == before


def _b64(data: dict[str, Any] | list[Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


MALFORMED_HEADERS = {
    "kid_int": ({"alg": "RS256", "kid": 5}, "invalid_token"),
    "kid_object": ({"alg": "RS256", "kid": {"a": 1}}, "invalid_token"),
    "kid_list": ({"alg": "RS256", "kid": ["k1"]}, "invalid_token"),
    "kid_null": ({"alg": "RS256", "kid": None}, "invalid_token"),
    "crit_not_list": ({"alg": "RS256", "kid": "k1", "crit": 5}, "invalid_token"),
    "alg_list": ({"alg": ["RS256"], "kid": "k1"}, "disallowed_algorithm"),
    "alg_object": ({"alg": {"x": "RS256"}, "kid": "k1"}, "disallowed_algorithm"),
    "header_not_object": ([1, 2], "malformed_token"),
}


@pytest.mark.integration
@pytest.mark.parametrize("case", sorted(MALFORMED_HEADERS))
def test_malformed_token_header_is_a_clean_denial(
    stack: Stack, case: str, caplog: pytest.LogCaptureFixture
) -> None:
    header, code = MALFORMED_HEADERS[case]
    token = f"{_b64(header)}.{_b64(claims())}.c2lnbmF0dXJl"
    with caplog.at_level(logging.INFO):
        status, body = send(stack.client.port, "/kid", [("authorization", f"Bearer {token}")])
    assert (status, body) == (401, {"error": code})
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert all(
        token not in r.getMessage() and token.split(".")[0] not in r.getMessage()
        for r in caplog.records
    )


def validate(**provider: Any) -> Any:
    return JwtCheckFactory().validate({"providers": [{"name": "p", "issuer": ISSUER, **provider}]})


@pytest.mark.parametrize(
    ("provider", "message"),
    [
        ({"audiences": ["a"], "jwks_url": "file:///etc/passwd"}, "only https URLs are allowed"),
        ({"audiences": ["a"], "jwks_url": "ftp://issuer.test/jwks"}, "only https URLs are allowed"),
        (
            {"audiences": ["a"], "jwks_url": "data:application/json,{}"},
            "only https URLs are allowed",
        ),
        ({"audiences": ["a"], "jwks_url": "https:///jwks"}, "only https URLs are allowed"),
        (
            {"audiences": ["a"], "jwks_url": "http://issuer.test/jwks"},
            "http is allowed only to a loopback host",
        ),
        (
            {
                "audiences": ["a"],
                "jwks_url": "http://issuer.test/jwks",
                "allow_insecure_http": True,
            },
            "http is allowed only to a loopback host",
        ),
        (
            {"audiences": ["a"], "jwks_url": "http://127.0.0.1:9/jwks"},
            "http needs allow_insecure_http: true",
        ),
        (
            {"audiences": ["a"], "jwks_url": "https://issuer.test/jwks", "jwks_min_refetch_s": 0},
            "jwks_min_refetch_s: Input should be greater than or equal to 1",
        ),
        (
            {
                "audiences": ["a"],
                "jwks_url": "https://issuer.test/jwks",
                "jwks_min_refetch_s": 0.01,
            },
            "jwks_min_refetch_s: Input should be greater than or equal to 1",
        ),
        ({"jwks": {"keys": []}}, "audiences is required"),
        ({"audiences": [], "jwks": {"keys": []}}, "audiences is required"),
        ({"audiences": "all", "jwks": {"keys": []}}, "audiences"),
    ],
)
def test_unsafe_provider_configs_are_refused(provider: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        validate(**provider)
    assert message in str(err.value)


@pytest.mark.parametrize(
    "url",
    [
        "https://issuer.test/jwks",
        "http://127.0.0.1:9/jwks",
        "http://[::1]:9/jwks",
        "http://localhost:9/jwks",
    ],
)
def test_safe_jwks_urls_are_accepted(url: str) -> None:
    config = validate(audiences=["a"], jwks_url=url, allow_insecure_http=url.startswith("http:"))
    assert config.providers[0].jwks_url == url


def test_keyset_refuses_non_https_urls_itself() -> None:
    for url in ("file:///etc/passwd", "http://issuer.test/jwks"):
        with pytest.raises(ConfigError):
            KeySet(url=url)


def ctx_with(token: str) -> RequestContext:
    r = request("/")
    r.attributes.request.http.headers["authorization"] = f"Bearer {token}"
    return RequestContext(r)


async def test_audiences_any_is_explicit_and_a_list_is_enforced(signer: Signer) -> None:
    any_aud = JwtCheck(validate(audiences="any", jwks={"keys": [signer.jwk]}))
    strict = JwtCheck(validate(audiences=["api"], jwks={"keys": [signer.jwk]}))
    for aud in ("api", "other", None):
        assert (await any_aud.check(ctx_with(signer.token(claims(aud=aud))))).allowed
    assert (await strict.check(ctx_with(signer.token(claims(aud="api"))))).allowed
    for aud in ("other", None):
        with pytest.raises(AuthzError) as err:
            await strict.check(ctx_with(signer.token(claims(aud=aud))))
        assert err.value.code == "wrong_audience"


class Redirector:
    """A loopback server answering every GET with a redirect to ``target``."""

    def __init__(self, target: str) -> None:
        outer = self
        self.hits = 0

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.hits += 1
                self.send_response(302)
                self.send_header("location", target)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                return None

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/jwks.json"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.mark.parametrize(
    "target", ["http://192.0.2.1/jwks.json", "file:///etc/passwd", "ftp://192.0.2.1/jwks.json"]
)
async def test_jwks_redirect_to_an_unsafe_url_is_not_followed(
    target: str, caplog: pytest.LogCaptureFixture
) -> None:
    server = Redirector(target)  # 192.0.2.1 is TEST-NET-1: refused before any connection
    try:
        keys = KeySet(url=server.url, allow_insecure_http=True, timeout_s=1)
        with caplog.at_level(logging.WARNING, logger="legation.extauthz.jwt"):
            with pytest.raises(AuthzError) as err:
                await keys.get("k1")
        assert err.value.code == "unknown_kid"
        assert server.hits == 1
        assert any("redirect" in r.getMessage().lower() for r in caplog.records)
    finally:
        server.close()


async def test_oversized_jwks_is_refused_and_known_keys_stay(
    signer: Signer, caplog: pytest.LogCaptureFixture
) -> None:
    jwks = JwksServer()
    try:
        jwks.document = {"keys": [signer.jwk]}
        keys = KeySet(url=jwks.url, allow_insecure_http=True, min_refetch_s=0.0, cache_s=300)
        assert (await keys.get("k1")).key_id == "k1"
        jwks.document = {"keys": [signer.jwk], "pad": "x" * (1 << 20)}
        with caplog.at_level(logging.WARNING, logger="legation.extauthz.jwt"):
            with pytest.raises(AuthzError):
                await keys.get("rotated")  # unknown kid: a refetch, refused for its size
        assert jwks.fetches == 2
        assert any("more than jwks_max_bytes" in r.getMessage() for r in caplog.records)
        assert (await keys.get("k1")).key_id == "k1"  # the keys held before still verify
    finally:
        jwks.close()


async def test_refusal_messages_never_carry_the_token(signer: Signer) -> None:
    """What a refusal says (the decision log's ``reason``) never includes the token."""
    token = signer.token(claims())
    bad = f"{_b64({'alg': 'RS256', 'kid': {'token': token}})}.{_b64(claims())}.c2ln"
    check = JwtCheck(validate(audiences=["api"], jwks={"keys": [signer.jwk]}))
    with pytest.raises(AuthzError) as err:
        await check.check(ctx_with(bad))
    assert err.value.code == "invalid_token"
    assert token not in str(err.value) and bad not in str(err.value)
