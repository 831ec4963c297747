"""Built-in filters in-process, on an Exchange (no Envoy)."""

from __future__ import annotations

import base64
import json

import pytest

from legation.extproc.exchange import Exchange
from legation.extproc.filters.body_redact import BodyRedactFactory
from legation.extproc.filters.header_route import HeaderRouteFactory, bucket_of, jwt_claims
from legation.extproc.filters.headers import HeadersFactory
from legation.extproc.sdk import Phase
from tests.extproc.conftest import jwt


def _ex(**headers: str) -> Exchange:
    ex = Exchange("c")
    ex.request_headers.update({k.replace("_", "-"): v for k, v in headers.items()})
    return ex


def _route(rules, **options):
    f = HeaderRouteFactory()
    return f.create(f.validate({"header": "x-cohort", "rules": rules, **options}))


def test_jwt_claims_tolerates_junk():
    assert jwt_claims(None) == {}
    assert jwt_claims("Bearer a.b") == {}
    assert jwt_claims("Bearer a.!!!.c") == {}
    assert jwt_claims("Bearer " + jwt({"sub": "u1"})) == {"sub": "u1"}


def test_bucket_is_stable_and_in_range():
    assert bucket_of("u1", seed="s", buckets=100) == bucket_of("u1", seed="s", buckets=100)
    assert all(0 <= bucket_of(f"u{i}", seed="", buckets=7) < 7 for i in range(50))
    assert {bucket_of(f"u{i}", seed="", buckets=2) for i in range(50)} == {0, 1}


def test_first_matching_rule_wins_and_clears_the_route_cache():
    f = _route(
        [
            {"header": "x-a", "equals": "1", "value": "first"},
            {"header": "x-a", "present": True, "value": "second"},
        ]
    )
    ex = _ex(x_a="1")
    f.on_request_headers(ex)
    assert ex.request_headers["x-cohort"] == "first"
    assert ex._clear_route_cache
    ex = _ex(x_a="2")
    f.on_request_headers(ex)
    assert ex.request_headers["x-cohort"] == "second"


def test_no_match_without_default_removes_a_spoofed_header():
    f = _route([{"cookie": "c", "equals": "1", "value": "canary"}])
    ex = _ex(x_cohort="canary")
    f.on_request_headers(ex)
    assert "x-cohort" not in ex.request_headers
    assert ex._removed == ["x-cohort"] and ex._clear_route_cache


def test_unchanged_header_does_not_clear_the_cache():
    f = _route([{"header": "x-a", "present": True, "value": "canary"}])
    ex = _ex(x_a="1", x_cohort="canary")
    f.on_request_headers(ex)
    assert not ex._clear_route_cache and ex._set is None


def test_non_string_claim_is_compared_as_json():
    f = _route([{"jwt_claim": "beta", "equals": "true", "value": "canary"}])
    ex = _ex(authorization="Bearer " + jwt({"beta": True}))
    f.on_request_headers(ex)
    assert ex.request_headers["x-cohort"] == "canary"


def test_headers_rename_then_remove_then_set_then_add():
    f = HeadersFactory()
    flt = f.create(
        f.validate(
            {
                "request": {
                    "rename": {"X-Old": "x-new"},
                    "remove": ["x-gone"],
                    "set": {"x-s": "1"},
                    "add": {"x-a": "2"},
                }
            }
        )
    )
    ex = _ex(x_old="v", x_gone="g", x_a="1")
    flt.on_request_headers(ex)
    assert ex.request_headers == {"x-new": "v", "x-s": "1", "x-a": "1,2"}
    assert flt.phases == frozenset({Phase.REQUEST_HEADERS})


def _redact(**options):
    f = BodyRedactFactory()
    return f.create(f.validate(options))


def test_redact_fields_at_any_depth_and_paths():
    flt = _redact(fields=["Password"], paths=["user.ssn"], mask="#")
    doc = {
        "password": "p",
        "user": {"ssn": "1", "name": "n"},
        "list": [{"PASSWORD": "q"}, {"ok": 1}],
    }
    assert flt.redact(doc)
    assert doc == {
        "password": "#",
        "user": {"ssn": "#", "name": "n"},
        "list": [{"PASSWORD": "#"}, {"ok": 1}],
    }
    assert not flt.redact({"other": 1})


def test_redact_leaves_invalid_json_alone_and_only_asks_for_json():
    flt = _redact(fields=["a"])
    ex = Exchange("c")
    ex.begin(Phase.RESPONSE_HEADERS)
    ex.response_headers["content-type"] = "text/html"
    flt.on_response_headers(ex)
    assert ex._mode is None
    ex.response_headers["content-type"] = "application/json; charset=utf-8"
    flt.on_response_headers(ex)
    assert ex._mode == {"response_body_mode": "BUFFERED"}
    ex.begin(Phase.RESPONSE_BODY)
    ex.body = b"{not json"
    flt.on_response_body(ex)
    assert ex._body is None
    ex.body = json.dumps({"a": "secret"}).encode()
    flt.on_response_body(ex)
    assert json.loads(ex._body) == {"a": "***"}


def test_want_body_rejects_a_header_phase():
    with pytest.raises(ValueError, match="not a body phase"):
        Exchange("c").want_body(Phase.RESPONSE_HEADERS)


def test_jwt_claims_of_a_hostile_token_are_none_never_a_crash() -> None:
    """A ~53 KB claims part nesting '[' 40,000 deep fits under Envoy's header limit; parsing it
    raised RecursionError, which the fused call-out answered with a 5xx (on a fail-open route:
    no rate limit counted). Deep nesting and oversized claims both read as no claims."""
    deep = base64.urlsafe_b64encode(b"[" * 40_000).decode().rstrip("=")
    assert jwt_claims(f"Bearer a.{deep}.c") == {}
    nested = base64.urlsafe_b64encode(b'{"sub":' * 3_000 + b"1" + b"}" * 3_000).decode()
    assert jwt_claims(f"Bearer a.{nested}.c") == {}
    big = base64.urlsafe_b64encode(b'{"sub":"' + b"x" * 20_000 + b'"}').decode()
    assert jwt_claims(f"Bearer a.{big}.c") == {}
    ok = base64.urlsafe_b64encode(b'{"sub":"alice"}').decode().rstrip("=")
    assert jwt_claims(f"Bearer a.{ok}.c") == {"sub": "alice"}
