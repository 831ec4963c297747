"""The jwt check through the real Envoy, chained with the shipped example policy
(policies/envoy/authz.rego): real RSA keys, a JWKS served from a loopback HTTP server."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Iterator
from typing import Any

import jwt as pyjwt
import pytest

from tests.extauthz.conftest import (
    REPO,
    JwksServer,
    Route,
    Signer,
    Stack,
    StackPool,
    read_log,
)

pytestmark = pytest.mark.integration

ISSUER = "https://issuer.test"
MIN_REFETCH_S = 1  # the smallest allowed: unknown kids refetch the JWKS at most once a second


@pytest.fixture(scope="module")
def keys() -> dict[str, Signer]:
    return {kid: Signer(kid) for kid in ("a", "b", "c")}


@pytest.fixture(scope="module")
def jwks(keys: dict[str, Signer]) -> Iterator[JwksServer]:
    server = JwksServer()
    server.document = {"keys": [keys["a"].jwk]}
    yield server
    server.close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: Any, jwks: JwksServer) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("jwt")
    provider = {
        "name": "test",
        "issuer": ISSUER,
        "audiences": ["legation"],
        "jwks_url": jwks.url,
        "allow_insecure_http": True,  # the JWKS server is on loopback
        "jwks_min_refetch_s": MIN_REFETCH_S,
        "leeway_s": 5,
        "required_claims": ["sub"],
        "claims_to_headers": {"sub": "x-jwt-sub"},
        "from_cookie": "session",
        "from_query": "access_token",
    }
    config = {
        "checks": {
            "jwt": {"type": "jwt", "options": {"providers": [provider]}},
            "authz": {
                "type": "rego",
                "options": {"policy_dir": str(REPO / "policies"), "reload_interval_s": 0},
            },
        },
        "decision_log": str(tmp / "decisions.jsonl"),
    }
    pool = StackPool(tmp)
    s = pool.make(
        config=config,
        routes=[
            Route("/people", policy="envoy.authz", checks=["jwt", "authz"]),
            Route("/jwt", policy="jwt-only", checks=["jwt"]),
        ],
    )
    s.log = tmp / "decisions.jsonl"  # type: ignore[attr-defined]
    yield s
    pool.close()


def claims(**over: Any) -> dict[str, Any]:
    now = int(time.time())
    return {
        "iss": ISSUER,
        "aud": "legation",
        "sub": "alice",
        "role": "guest",
        "iat": now,
        "exp": now + 300,
        **over,
    }


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hs256_with_public_key(signer: Signer, payload: dict[str, Any]) -> str:
    """The HS/RS confusion attack: HMAC-sign with the RSA public key as the secret."""
    head = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": signer.kid}).encode())
    body = b64(json.dumps(payload).encode())
    mac = hmac.new(signer.public_pem(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(mac)}"


def test_valid_token_and_example_policy(stack: Stack, keys: dict[str, Signer]) -> None:
    guest = keys["a"].token(claims())
    r = stack.client.get("/people", headers=bearer(guest))
    assert r.status == 200, r.body
    echoed = r.json()["headers"]
    assert echoed["x-jwt-sub"] == "alice"
    assert echoed["x-legation-role"] == "guest"
    assert r.headers["x-legation-policy"] == "envoy.authz"
    denied = stack.client.get("/people/bob", headers=bearer(guest))
    assert denied.status == 403
    assert denied.json() == {"error": "forbidden", "policy": "envoy.authz"}
    admin = keys["a"].token(claims(role="admin"))
    post = stack.client.request(
        "POST",
        "/people",
        headers={**bearer(admin), "content-type": "application/json"},
        body=b'{"firstname": "Alice"}',
    )
    assert post.status == 200, post.body
    other = stack.client.request(
        "POST",
        "/people",
        headers={**bearer(admin), "content-type": "application/json"},
        body=b'{"firstname": "Bob"}',
    )
    assert other.status == 403


BAD = {
    "expired": (
        lambda k: bearer(k["a"].token(claims(exp=int(time.time()) - 100))),
        "token_expired",
    ),
    "not_yet_valid": (
        lambda k: bearer(k["a"].token(claims(nbf=int(time.time()) + 100))),
        "token_not_yet_valid",
    ),
    "wrong_audience": (
        lambda k: bearer(k["a"].token(claims(aud="someone-else"))),
        "wrong_audience",
    ),
    "wrong_issuer": (
        lambda k: bearer(k["a"].token(claims(iss="https://evil.test"))),
        "wrong_issuer",
    ),
    "bad_signature": (lambda k: bearer(k["b"].token(claims(), kid="a")), "bad_signature"),
    "unknown_kid": (lambda k: bearer(k["a"].token(claims(), kid="nope")), "unknown_kid"),
    "alg_none": (
        lambda k: bearer(pyjwt.encode(claims(), None, algorithm="none", headers={"kid": "a"})),
        "disallowed_algorithm",
    ),
    "hs256_with_rsa_public_key": (
        lambda k: bearer(hs256_with_public_key(k["a"], claims())),
        "disallowed_algorithm",
    ),
    "missing_token": (lambda k: {}, "missing_token"),
    "malformed_token": (lambda k: bearer("not.a-jwt"), "malformed_token"),
    "missing_required_claim": (
        lambda k: bearer(k["a"].token({key: v for key, v in claims().items() if key != "sub"})),
        "missing_claim",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_tokens_are_denied(stack: Stack, keys: dict[str, Signer], case: str) -> None:
    make_headers, code = BAD[case]
    before = stack.upstream.requests
    r = stack.client.get("/jwt/x", headers=make_headers(keys))
    assert r.status == 401
    assert r.json() == {"error": code}
    assert stack.upstream.requests == before


def test_token_from_cookie_and_query(stack: Stack, keys: dict[str, Signer]) -> None:
    token = keys["a"].token(claims(sub="carol"))
    r = stack.client.get("/jwt/c", headers={"cookie": f"theme=dark; session={token}"})
    assert r.status == 200
    assert r.json()["headers"]["x-jwt-sub"] == "carol"
    q = stack.client.get(f"/jwt/q?access_token={token}")
    assert q.status == 200


def test_decision_log_never_contains_tokens(stack: Stack, keys: dict[str, Signer]) -> None:
    token = keys["a"].token(claims(sub="dave"))
    stack.client.get(f"/jwt/q?access_token={token}")
    stack.client.get("/people", headers=bearer(token))
    bad = keys["a"].token(claims(exp=int(time.time()) - 100))
    stack.client.get("/jwt/x", headers=bearer(bad))
    entries = read_log(
        stack.log,  # type: ignore[attr-defined]
        lambda e: [x["path"] for x in e[-3:]] == ["/jwt/q", "/people", "/jwt/x"],
    )
    assert [e["path"] for e in entries[-3:]] == ["/jwt/q", "/people", "/jwt/x"]
    text = stack.log.read_text()  # type: ignore[attr-defined]
    for secret in (token, bad, token.split(".")[2]):
        assert secret not in text


def test_jwks_rotation_picks_up_new_kid(
    stack: Stack, keys: dict[str, Signer], jwks: JwksServer
) -> None:
    token = keys["c"].token(claims())
    time.sleep(MIN_REFETCH_S + 0.1)  # past the refetch floor: the unknown kid refetches
    fetches = jwks.fetches
    assert stack.client.get("/jwt/r", headers=bearer(token)).json() == {"error": "unknown_kid"}
    assert jwks.fetches == fetches + 1
    # within the floor, more unknown kids do not reach the issuer
    assert stack.client.get(
        "/jwt/r", headers=bearer(keys["b"].token(claims(), kid="other"))
    ).json() == {"error": "unknown_kid"}
    assert jwks.fetches == fetches + 1
    jwks.document = {"keys": [keys["a"].jwk, keys["c"].jwk]}
    time.sleep(MIN_REFETCH_S + 0.1)
    r = stack.client.get("/jwt/r", headers=bearer(token))
    assert r.status == 200
    assert jwks.fetches == fetches + 2
    # the verified token is cached: no further fetch, still allowed
    assert stack.client.get("/jwt/r", headers=bearer(token)).status == 200
    assert jwks.fetches == fetches + 2
