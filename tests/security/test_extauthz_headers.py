"""Header injection through a policy result: a header name or value that is not RFC 9110 (CR, LF,
NUL, other controls, a name that is not a token) makes the result a policy error, so the request
is denied with the error status (fail closed), and Envoy validates mutations as a second line.

The policy in the Envoy tests echoes a decoded query parameter into a header, as a Rego policy
``headers := {"x-user": input.parsed_query.user[0]}`` would: ``%0d%0a`` arrives as CR LF.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from legation import plugins
from legation.extauthz import envoy_filter
from legation.extauthz import servicer as servicer_module
from legation.extauthz.checks import Decision, PythonCheck
from legation.extauthz.errors import AuthzError
from legation.extauthz.request import RequestContext
from legation.extauthz.response import decision_from_result
from legation.extauthz.service import Settings, build_servicer, close_checks
from tests.extauthz.conftest import Route, Stack, StackPool
from tests.extauthz.test_units import request

BAD_VALUES = ["a\r\nx-admin: 1", "a\nb", "a\rb", "a\x00b", "a\x01b", "a\x7fb"]
BAD_NAMES = ["x-user\r\nx-admin", "x user", "x-user:", "", "x\x00", "é", "x(y)"]


@pytest.mark.parametrize("field", ["headers", "response_headers_to_add"])
@pytest.mark.parametrize("value", BAD_VALUES)
def test_bad_header_value_in_a_result_is_a_policy_error(field: str, value: str) -> None:
    for result in (
        {"allowed": True, field: {"x-user": value}},
        {"allowed": True, field: {"x-user": ["ok", value]}},
        {"allowed": False, field: {"x-user": value}},
    ):
        with pytest.raises(AuthzError) as err:
            decision_from_result(result, where="policy p")
        assert err.value.code == "invalid_policy_result"
        assert not err.value.is_client_error  # the error status: fail closed
        assert "\r" not in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("field", ["headers", "response_headers_to_add"])
@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_header_name_in_a_result_is_a_policy_error(field: str, name: str) -> None:
    with pytest.raises(AuthzError) as err:
        decision_from_result({"allowed": True, field: {name: "v"}}, where="policy p")
    assert err.value.code == "invalid_policy_result"


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_header_to_remove_is_a_policy_error(name: str) -> None:
    with pytest.raises(AuthzError) as err:
        decision_from_result(
            {"allowed": True, "request_headers_to_remove": ["ok", name]}, where="policy p"
        )
    assert err.value.code == "invalid_policy_result"


def test_valid_headers_still_pass() -> None:
    d = decision_from_result(
        {
            "allowed": True,
            "headers": {"X-User": 'Zoë\tand "q" ~!'},
            "response_headers_to_add": {":status-like": "v"},
            "request_headers_to_remove": ["x-drop"],
        },
        where="p",
    )
    assert d.headers == {"X-User": 'Zoë\tand "q" ~!'}
    assert d.request_headers_to_remove == ("x-drop",)


class EchoPolicy(PythonCheck):
    """A policy that puts the (decoded) ``user`` query parameter into a header of its result;
    with ``raw`` it hands the servicer a Decision directly, as a Python check may."""

    name = "echo"

    def __init__(self, raw: bool) -> None:
        self.raw = raw

    async def check(self, ctx: RequestContext) -> Decision:
        user = ctx.input()["parsed_query"].get("user", ["anonymous"])[0]
        where = ctx.input()["parsed_query"].get("where", ["headers"])[0]
        if self.raw:
            return Decision(allowed=True, headers={"x-user": user})
        return decision_from_result({"allowed": True, where: {"x-user": user}}, where="policy echo")


class EchoFactory:
    name = "echo"

    def validate(self, raw: Any) -> dict[str, Any]:
        return dict(raw)

    def create(self, config: dict[str, Any]) -> EchoPolicy:
        return EchoPolicy(bool(config.get("raw")))


@pytest.fixture(scope="module")
def stack(tmp_path_factory: Any) -> Iterator[Stack]:
    plugins.register("extauthz.check", EchoFactory())
    pool = StackPool(tmp_path_factory.mktemp("headers"))
    try:
        yield pool.make(
            config={
                "checks": {
                    "echo": {"type": "echo"},
                    "raw": {"type": "echo", "options": {"raw": True}},
                },
                "error_status": 503,
            },
            routes=[Route("/raw", checks=["raw"]), Route("/", checks=["echo"])],
        )
    finally:
        pool.close()
        plugins.unregister("extauthz.check", "echo")


@pytest.mark.integration
def test_generated_filter_validates_mutations_and_envoy_accepts_it(stack: Stack) -> None:
    assert envoy_filter.http_filter("c").typed_config.value  # packs
    dump = json.dumps(stack.envoy.config_dump())
    assert '"validate_mutations": true' in dump


@pytest.mark.integration
@pytest.mark.parametrize("where", ["headers", "response_headers_to_add"])
@pytest.mark.parametrize("user", ["a%0d%0ax-admin:%201", "a%0ab", "a%00b", "a%0db"])
def test_injected_header_from_a_policy_denies_with_the_error_status(
    stack: Stack, where: str, user: str
) -> None:
    before = stack.upstream.requests
    r = stack.client.get(f"/echo?user={user}&where={where}")
    assert r.status == 503, r.body
    assert r.json() == {"error": "invalid_policy_result"}
    assert "x-admin" not in r.headers
    assert stack.upstream.requests == before


@pytest.mark.integration
def test_python_check_decision_with_an_injected_header_denies(stack: Stack) -> None:
    before = stack.upstream.requests
    r = stack.client.get("/raw?user=a%0d%0ax-admin:%201")
    assert r.status == 503
    assert r.json() == {"error": "invalid_result"}
    assert stack.upstream.requests == before
    ok = stack.client.get("/raw?user=alice")
    assert ok.status == 200 and ok.json()["headers"]["x-user"] == "alice"


@pytest.mark.integration
def test_envoy_refuses_invalid_mutations_even_if_the_service_let_one_through(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second line: with the service's check switched off, ``validate_mutations`` makes
    Envoy refuse the response itself (500, measured with Envoy 1.40); without it, Envoy took the
    header into the request and only the upstream codec refused it (503 "invalid header value")."""
    monkeypatch.setattr(servicer_module, "check_decision", lambda decision: None)
    before = stack.upstream.requests
    r = stack.client.get("/raw?user=a%0d%0ax-admin:%201")
    assert r.status == 500, (r.status, r.body)
    assert stack.upstream.requests == before


async def test_servicer_answers_a_well_formed_denial_for_a_bad_decision() -> None:
    plugins.register("extauthz.check", EchoFactory())
    try:
        servicer = await build_servicer(
            Settings(
                config={
                    "checks": {"raw": {"type": "echo", "options": {"raw": True}}},
                    "default_checks": ["raw"],
                    "error_status": 500,
                },
                registry=CollectorRegistry(),
            )
        )
        response = await servicer.Check(request("/a?user=x%0D%0Ay"), None)
        assert response.status.code == 7  # PERMISSION_DENIED
        assert response.denied_response.status.code == 500
        assert json.loads(response.denied_response.body) == {"error": "invalid_result"}
        assert all("\r" not in h.header.value for h in response.denied_response.headers)
        await close_checks(servicer)
    finally:
        plugins.unregister("extauthz.check", "echo")


@pytest.mark.parametrize(
    "decision",
    [
        Decision(allowed=False, body=b"bytes"),  # type: ignore[arg-type]
        Decision(allowed=True, headers={"x-ok": "1"}, body=None),  # type: ignore[arg-type]
    ],
)
def test_a_body_that_is_not_text_is_refused_with_or_without_headers(decision: Decision) -> None:
    from legation.extauthz.response import check_decision

    with pytest.raises(AuthzError) as info:
        check_decision(decision)
    assert info.value.code == "invalid_result"
