"""Fuzzing the request path with hypothesis: any CheckRequest Envoy could send (arbitrary Unicode
header names and values, paths, query strings, bodies, tokens, route settings) gives either an
input document or a named client error, and the servicer (a jwt check and a trivial allow check,
no Rego engine) answers every one with a well-formed CheckResponse.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import pytest
from envoy.service.auth.v3 import external_auth_pb2
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from legation import plugins
from legation.extauthz._headers import bad_header_name, bad_header_value
from legation.extauthz.checks import ALLOW, Decision, PythonCheck
from legation.extauthz.errors import AuthzError
from legation.extauthz.request import RequestContext, build_input, parse_path
from legation.extauthz.service import Settings, build_servicer, close_checks
from legation.extauthz.servicer import AuthorizationServicer
from tests.extauthz.conftest import Signer

FUZZ = settings(
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# what a protobuf string field holds: any Unicode scalar value (no lone surrogates)
text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
url_chars = st.text(st.sampled_from(list("abc/?&=%+;#.~ 2fFzZ0é\r\n\x00")), max_size=40)
paths = st.one_of(text, url_chars, st.builds(lambda s: "/" + s, url_chars))
content_types = st.one_of(
    st.sampled_from(
        [
            "",
            "application/json",
            "application/json; charset=utf-8",
            "application/problem+json",
            "application/x-www-form-urlencoded",
            "text/plain",
            "multipart/form-data; boundary=x",
        ]
    ),
    text,
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
    max_leaves=12,
)
bodies = st.one_of(text, url_chars, json_values.map(json.dumps))

SIGNER = Signer("fuzz")
ISSUER = "https://issuer.test"


def claims_strategy() -> st.SearchStrategy[dict[str, Any]]:
    now = int(time.time())
    return st.fixed_dictionaries(
        {"iss": st.just(ISSUER), "aud": st.just("api"), "exp": st.just(now + 300)},
        optional={
            "sub": st.one_of(text, json_values),
            "role": st.one_of(text, json_values),
            "nbf": st.integers(now - 100, now + 100),
        },
    )


def _b64(value: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()


# tokens whose header is any JSON: a kid that is a number, an object, a list; an odd alg, crit
raw_headers = st.dictionaries(
    st.sampled_from(["alg", "kid", "typ", "crit", "jku"]), json_values, max_size=4
)
tokens = st.one_of(
    st.tuples(raw_headers, claims_strategy()).map(
        lambda hc: f"Bearer {_b64(hc[0])}.{_b64(hc[1])}.c2ln"
    ),
    st.none(),
    text.map(lambda t: f"Bearer {t}"),
    claims_strategy().map(lambda c: f"Bearer {SIGNER.token(c)}"),
    st.tuples(claims_strategy(), text).map(lambda ct: f"Bearer {SIGNER.token(ct[0], kid=ct[1])}"),
)


@st.composite
def check_requests(draw: st.DrawFn) -> external_auth_pb2.CheckRequest:
    r = external_auth_pb2.CheckRequest()
    h = r.attributes.request.http
    h.method = draw(st.sampled_from(["GET", "POST", "PUT", ""]) | text)
    h.path = draw(paths)
    h.host = draw(text)
    for name, value in draw(st.dictionaries(text, text, max_size=6)).items():
        h.headers[name] = value
    ctype = draw(content_types)
    if ctype:
        h.headers["content-type"] = ctype
    if draw(st.booleans()):
        h.raw_body = draw(st.binary(max_size=64) | bodies.map(str.encode))
    else:
        h.body = draw(bodies)
    length = draw(st.none() | st.integers(-5, 200).map(str) | text)
    if length is not None:
        h.headers["content-length"] = length
    if draw(st.booleans()):
        h.headers["x-envoy-auth-partial-body"] = draw(st.sampled_from(["true", "false"]))
    token = draw(tokens)
    if token is not None:
        h.headers["authorization"] = token
    if draw(st.booleans()):
        r.attributes.context_extensions["policy"] = draw(text)
    checks = draw(st.sampled_from(["jwt", "allow", "jwt,allow", "allow,jwt", None]) | text)
    if checks is not None:
        r.attributes.context_extensions["checks"] = checks
    r.attributes.source.principal = draw(st.sampled_from(["", "spiffe://mesh/ns/a"]) | text)
    return r


@FUZZ
@given(check_requests())
def test_any_check_request_builds_an_input_or_a_named_client_error(
    request: external_auth_pb2.CheckRequest,
) -> None:
    try:
        doc = build_input(request)
    except AuthzError as e:
        assert e.code in {"malformed_path", "malformed_body"} and e.status == 400
        return
    json.dumps(doc)  # the document is plain JSON, as a policy engine gets it
    http = request.attributes.request.http
    http_doc = doc["attributes"]["request"]["http"]  # empty fields absent, as opa-envoy-plugin
    assert http_doc.get("headers", {}) == dict(http.headers)
    assert http_doc.get("path", "") == http.path
    assert all(isinstance(s, str) for s in doc["parsed_path"])
    ctx = RequestContext(request)
    assert ctx.input()["parsed_path"] == doc["parsed_path"]


@FUZZ
@given(
    st.lists(text.filter(lambda s: "/" not in s), min_size=1, max_size=5),
    st.lists(st.tuples(text, text), max_size=5),
)
def test_the_policy_sees_exactly_the_segments_and_parameters_sent(
    segments: list[str], params: list[tuple[str, str]]
) -> None:
    if segments[0] == "":
        segments[0] = "x"  # leading slashes are trimmed, as opa-envoy-plugin does
    path = "/" + "/".join(quote(s, safe="") for s in segments)
    if params:
        path += "?" + "&".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in params)
    parsed_path, parsed_query = parse_path(path)
    assert parsed_path == segments
    expected: dict[str, list[str]] = {}
    for k, v in params:
        expected.setdefault(k, []).append(v)
    if params:
        assert parsed_query == expected


class Allow(PythonCheck):
    """Allows, after building the whole input document as a policy check would."""

    name = "allow"

    async def check(self, ctx: RequestContext) -> Decision:
        json.dumps(ctx.input())
        return ALLOW


class AllowFactory:
    name = "allow"

    def validate(self, raw: Any) -> dict[str, Any]:
        return dict(raw)

    def create(self, config: dict[str, Any]) -> Allow:
        return Allow()


@pytest.fixture(scope="module")
def servicer() -> Iterator[tuple[asyncio.AbstractEventLoop, AuthorizationServicer]]:
    plugins.register("extauthz.check", AllowFactory())
    loop = asyncio.new_event_loop()
    provider = {
        "name": "idp",
        "issuer": ISSUER,
        "audiences": ["api"],
        "jwks": {"keys": [SIGNER.jwk]},
        "claims_to_headers": {"sub": "x-jwt-sub", "role": "x-jwt-role"},
        "claims_to_metadata": ["sub"],
    }
    try:
        s = loop.run_until_complete(
            build_servicer(
                Settings(
                    config={
                        "checks": {
                            "jwt": {"type": "jwt", "options": {"providers": [provider]}},
                            "allow": {"type": "allow"},
                        },
                        "default_checks": ["jwt", "allow"],
                        "error_status": 503,
                    },
                    registry=CollectorRegistry(),
                )
            )
        )
        yield loop, s
        loop.run_until_complete(close_checks(s))
    finally:
        loop.close()
        plugins.unregister("extauthz.check", "allow")


@FUZZ
@given(check_requests())
def test_the_servicer_answers_every_request_with_a_well_formed_response(
    servicer: tuple[asyncio.AbstractEventLoop, AuthorizationServicer],
    request: external_auth_pb2.CheckRequest,
) -> None:
    loop, s = servicer
    response = loop.run_until_complete(s.Check(request, None))
    again = external_auth_pb2.CheckResponse.FromString(response.SerializeToString())
    assert again == response
    assert len(response.dynamic_metadata["decision_id"]) == 32
    event(
        f"status {response.status.code} "
        f"{json.loads(response.denied_response.body or '{}').get('error', '')}"
    )
    if response.status.code == 0:
        ok = response.ok_response
        options = list(ok.headers) + list(ok.response_headers_to_add)
        names = list(ok.headers_to_remove)
        assert set(names) <= {"x-jwt-sub", "x-jwt-role"}
    else:
        assert response.status.code == 7  # PERMISSION_DENIED
        denied = response.denied_response
        assert denied.status.code in (400, 401, 403, 503)
        error = json.loads(denied.body)["error"]
        assert error != "internal", request  # every failure is a named one, never a crash
        options = list(denied.headers)
        names = []
    for option in options:
        assert not bad_header_name(option.header.key)
        assert not bad_header_value(option.header.value)
    for name in names:
        assert not bad_header_name(name)
