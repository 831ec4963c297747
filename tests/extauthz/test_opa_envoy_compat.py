"""A policy in the shape of the OPA-Envoy tutorial (written for opa-envoy-plugin: the token is
verified in Rego with io.jwt.decode_verify, `import input.attributes.request.http`, a boolean
`allow`) runs unchanged in the embedded engine, through the real servicer and input document."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from pathlib import Path

import pytest
from envoy.service.auth.v3 import external_auth_pb2
from prometheus_client import CollectorRegistry

from legation.extauthz.service import Settings, build_servicer, close_checks

TUTORIAL_STYLE = """package envoy.authz

import input.attributes.request.http as http_request

default allow := false

allow if {
	is_token_valid
	action_allowed
}

is_token_valid if {
	token.valid
	now := time.now_ns() / 1000000000
	token.payload.nbf <= now
	now < token.payload.exp
}

action_allowed if {
	http_request.method == "GET"
	token.payload.role == "guest"
	glob.match("/people", ["/"], http_request.path)
}

action_allowed if {
	http_request.method == "GET"
	token.payload.role == "admin"
	glob.match("/people/*", ["/"], http_request.path)
}

action_allowed if {
	http_request.method == "POST"
	token.payload.role == "admin"
	glob.match("/people", ["/"], http_request.path)
	lower(input.parsed_body.firstname) == base64url.decode(token.payload.sub)
}

token := {"valid": valid, "payload": payload} if {
	[_, encoded] := split(http_request.headers.authorization, " ")
	[valid, _, payload] := io.jwt.decode_verify(encoded, {"secret": "secret"})
}
"""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hs256(claims: dict[str, object], secret: bytes = b"secret") -> str:
    head = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = _b64(json.dumps(claims).encode())
    sig = hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{_b64(sig)}"


def check_request(
    method: str, path: str, token: str | None, body: str = ""
) -> external_auth_pb2.CheckRequest:
    r = external_auth_pb2.CheckRequest()
    h = r.attributes.request.http
    h.method, h.path, h.host = method, path, "svc"
    if token is not None:
        h.headers["authorization"] = f"Bearer {token}"
    if body:
        h.headers["content-type"] = "application/json"
        h.body = body
    r.attributes.context_extensions["policy"] = "envoy.authz"
    return r


@pytest.fixture
def policy_dir(tmp_path: Path) -> Path:
    (tmp_path / "policy.rego").write_text(TUTORIAL_STYLE)
    return tmp_path


def now() -> int:
    return int(time.time())


CASES = [
    # (method, path, role, sub, body, token secret, expected)
    ("GET", "/people", "guest", "alice", "", b"secret", True),
    ("GET", "/people/bob", "guest", "alice", "", b"secret", False),
    ("GET", "/people/bob", "admin", "bob", "", b"secret", True),
    ("POST", "/people", "admin", "bob", '{"firstname": "Bob"}', b"secret", True),
    ("POST", "/people", "admin", "bob", '{"firstname": "Charlie"}', b"secret", False),
    ("POST", "/people", "guest", "alice", '{"firstname": "Alice"}', b"secret", False),
    ("GET", "/people", "guest", "alice", "", b"not-the-secret", False),
]


@pytest.mark.parametrize(("method", "path", "role", "sub", "body", "secret", "expected"), CASES)
async def test_tutorial_style_policy_decides_unchanged(
    policy_dir: Path,
    method: str,
    path: str,
    role: str,
    sub: str,
    body: str,
    secret: bytes,
    expected: bool,
) -> None:
    servicer = await build_servicer(
        Settings(
            config={
                "checks": {
                    "rego": {
                        "type": "rego",
                        "options": {"policy_dir": str(policy_dir), "reload_interval_s": 0},
                    }
                },
                "default_checks": ["rego"],
            },
            registry=CollectorRegistry(),
        )
    )
    try:
        claims = {"role": role, "sub": _b64(sub.encode()), "nbf": now() - 60, "exp": now() + 600}
        response = await servicer.Check(
            check_request(method, path, hs256(claims, secret), body), None
        )
        assert (response.status.code == 0) is expected
        if not expected:
            assert response.denied_response.status.code == 403
    finally:
        await close_checks(servicer)


async def test_expired_and_missing_tokens_are_denied(policy_dir: Path) -> None:
    servicer = await build_servicer(
        Settings(
            config={
                "checks": {
                    "rego": {
                        "type": "rego",
                        "options": {"policy_dir": str(policy_dir), "reload_interval_s": 0},
                    }
                },
                "default_checks": ["rego"],
            },
            registry=CollectorRegistry(),
        )
    )
    try:
        expired = hs256({"role": "guest", "sub": "x", "nbf": now() - 600, "exp": now() - 60})
        for token in (expired, None):
            response = await servicer.Check(check_request("GET", "/people", token), None)
            assert response.denied_response.status.code == 403
    finally:
        await close_checks(servicer)
