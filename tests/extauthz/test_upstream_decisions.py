"""Policy + CheckRequest -> Envoy's answer, through the real servicer and the ``rego`` check.

Policies and requests are retyped from opa-envoy-plugin's ``internal/internal_test.go``
(``testAuthzServer``, ``testAuthzServerWithObjectDecision``, ``...WithSpiffeDecision``,
``...WithTruncatedBody`` and the per-test modules); each case names the test it mirrors. Where
upstream answers with a gRPC error (Envoy then applies ``status_on_error``), Legation answers a
denial with its ``error_status`` (both 403 by default): the tests assert that. Upstream's
``path`` (``envoy/authz/result``) is the ``rego`` check's ``decision`` rule here; partial-set
rules are written with ``contains`` (OPA v1 syntax).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from envoy.service.auth.v3 import external_auth_pb2
from google.protobuf import json_format
from google.protobuf.json_format import MessageToDict
from prometheus_client import CollectorRegistry

from legation.extauthz.request import InputOptions
from legation.extauthz.service import Settings, build_servicer, close_checks
from legation.extauthz.servicer import AuthorizationServicer

HEADERS = {
    ":authority": "192.168.99.100:31380",
    ":method": "GET",
    ":path": "/api/v1/products",
    "accept": "*/*",
    "content-length": "0",
    "user-agent": "curl/7.54.0",
    "x-forwarded-proto": "http",
    "x-request-id": "92a6c0f7-0250-944b-9cfc-ae10cbcedd8e",
}


def req(http: dict[str, Any], **attributes: Any) -> dict[str, Any]:
    return {
        "attributes": {
            "request": {"http": {"id": "13359530607844510314", "method": "GET", **http}},
            **attributes,
        }
    }


ALLOWED = req(
    {
        "headers": {**HEADERS, "authorization": "Basic Ym9iOnBhc3N3b3Jk"},
        "path": "/api/v1/products",
        "host": "192.168.99.100:31380",
        "protocol": "HTTP/1.1",
        "body": '{"firstname": "foo", "lastname": "bar"}',
    }
)
DENIED = req(
    {
        "headers": {**HEADERS, "authorization": "Basic YWxpY2U6cGFzc3dvcmQ="},
        "path": "/api/v1/products",
        "host": "192.168.99.100:31380",
        "protocol": "HTTP/1.1",
        "body": "foo",
    }
)
PARSED_PATH = req({"path": "/my/test/path?a=1&a=2&x=y"})
PARSED_BODY = req(
    {
        "headers": {"content-type": "application/json"},
        "body": '{"firstname": "foo", "lastname": "bar", "dept": {"it": "eng"}}',
    }
)
DENIED_PARSED_BODY = req({"body": "foo"})
INVALID = req({"headers": {"content-type": "application/json"}, "body": '["foo" : 42}'})
BODY_62 = '{"firstname": "foo", "lastname": "bar", "dept": {"it": "eng"}}'

RBAC = """package envoy.authz

import input.attributes.request.http as http_request

default allow = false

allow if {
	roles_for_user[r]
	required_roles[r]
}

allow if {
	input.parsed_path = ["my", "test", "path"]
	input.parsed_query.a = ["1", "2"]
	input.parsed_query.x = ["y"]
}

allow if {
	input.parsed_body.firstname == "foo"
	input.parsed_body.lastname == "bar"
	input.parsed_body.dept.it == "eng"
}

roles_for_user contains r if {
	r := user_roles[user_name][_]
}

required_roles contains r if {
	perm := role_perms[r][_]
	perm.method = http_request.method
	perm.path = http_request.path
}

user_name = parsed if {
	[_, encoded] := split(http_request.headers.authorization, " ")
	[parsed, _] := split(base64url.decode(encoded), ":")
}

user_roles = {"alice": ["guest"], "bob": ["admin"]}

role_perms = {
	"guest": [{"method": "GET", "path": "/productpage"}],
	"admin": [
		{"method": "GET", "path": "/productpage"},
		{"method": "GET", "path": "/api/v1/products"},
	],
}

result.allowed = allow

result.headers = {"foo": "bar", "baz": "qux"}

result.request_headers_to_remove = ["foo", "bar", "baz", "qux"]

result.query_parameters_to_remove = ["foo", "bar", "baz", "qux"]

result.query_parameters_to_set = {"foo": "bar", "baz": ["qux", "quux"]}

result.response_headers_to_add = {"foo": "bar", "baz": "qux"}
"""

OBJECT_DECISION = """package envoy.authz

default allow = {
	"allowed": false,
	"headers": {"foo": "bar", "baz": "taz"},
	"body": "Unauthorized Request",
	"http_status": 301,
	"dynamic_metadata": {"test": "foo", "bar": "baz"},
}

allow = response if {
	input.parsed_path = ["my", "test", "path"]
	response := {
		"allowed": true,
		"headers": {"x": "hello", "y": "world"},
		"dynamic_metadata": {"test": "foo", "bar": "baz"},
	}
}
"""

SPIFFE = """package envoy.authz

default allow = false

missingId := true if not input.source_principal

allow if {
	not missingId
	input.source_principal == "spiffe://test-domain/test"
}

result.allowed = allow
"""

TRUNCATED = """package envoy.authz

default allow = false

allow if {
	not input.truncated_body
}
"""

ON_PATH = """package envoy.authz

default allow = false

allow if {
	input.parsed_path = ["my", "test", "path"]
}
"""

Servicer = Callable[..., Awaitable[AuthorizationServicer]]


@pytest.fixture
async def servicer(tmp_path: Path) -> AsyncIterator[Servicer]:
    made: list[AuthorizationServicer] = []

    async def make(
        module: str,
        *,
        rule: str = "allow",
        dry_run: list[str] | None = None,
        options: InputOptions | None = None,
    ) -> AuthorizationServicer:
        policy_dir = tmp_path / f"p{len(made)}"
        policy_dir.mkdir()
        (policy_dir / "policy.rego").write_text(module)
        s = await build_servicer(
            Settings(
                config={
                    "checks": {
                        "rego": {
                            "type": "rego",
                            "options": {
                                "policy_dir": str(policy_dir),
                                "reload_interval_s": 0,
                                "decision": rule,
                            },
                        }
                    },
                    "default_checks": ["rego"],
                    "dry_run": dry_run or [],
                },
                registry=CollectorRegistry(),
            )
        )
        s.input_options = options
        made.append(s)
        return s

    yield make
    for s in made:
        await close_checks(s)


async def check(s: AuthorizationServicer, request: dict[str, Any], policy: str) -> Any:
    r = json_format.ParseDict(request, external_auth_pb2.CheckRequest())
    r.attributes.context_extensions["policy"] = policy
    return await s.Check(r, None)


def pairs(options: Any) -> list[tuple[str, str]]:
    return sorted((o.header.key, o.header.value) for o in options)


def meta(response: Any) -> dict[str, Any]:
    """Dynamic metadata without Legation's own additions (policy name, dry_run)."""
    out = MessageToDict(response.dynamic_metadata)
    out.pop("policy", None)
    return out


# (upstream test, request, allowed)
RBAC_CASES = [
    ("TestCheckAllow", ALLOWED, True),
    ("TestCheckDeny", DENIED, False),
    ("TestCheckAllowParsedPath", PARSED_PATH, True),
    ("TestCheckAllowParsedBody", PARSED_BODY, True),
    ("TestCheckDenyParsedBody", DENIED_PARSED_BODY, False),
]


async def test_rbac_policy_of_test_authz_server(servicer: Servicer) -> None:
    s = await servicer(RBAC, rule="result")
    for name, request, allowed in RBAC_CASES:
        r = await check(s, request, "envoy/authz/result")
        assert (r.status.code == 0) is allowed, name
        assert len(r.dynamic_metadata["decision_id"]) == 32, name  # ...DynamicMetadataDecisionID
        if allowed:
            ok = r.ok_response
            assert pairs(ok.headers) == [("baz", "qux"), ("foo", "bar")], name
            assert list(ok.headers_to_remove) == ["foo", "bar", "baz", "qux"], name
            assert list(ok.query_parameters_to_remove) == ["foo", "bar", "baz", "qux"], name
            assert sorted((q.key, q.value) for q in ok.query_parameters_to_set) == [
                ("baz", "quux"),
                ("baz", "qux"),
                ("foo", "bar"),
            ], name
            assert pairs(ok.response_headers_to_add) == [("baz", "qux"), ("foo", "bar")], name
        else:
            assert r.denied_response.status.code == 403, name
            assert pairs(r.denied_response.headers) == [("baz", "qux"), ("foo", "bar")], name
    # TestCheckBadDecisionWithLogger: a body that does not parse is a 400 denial
    bad = await check(s, INVALID, "envoy/authz/result")
    assert bad.status.code == 7 and bad.denied_response.status.code == 400


async def test_object_decision(servicer: Servicer) -> None:
    s = await servicer(OBJECT_DECISION)
    ok = await check(s, PARSED_PATH, "envoy/authz/allow")  # TestCheckAllowObjectDecision
    assert ok.status.code == 0
    assert pairs(ok.ok_response.headers) == [("x", "hello"), ("y", "world")]
    assert not ok.ok_response.headers_to_remove and not ok.ok_response.response_headers_to_add
    assert meta(ok) == {"test": "foo", "bar": "baz", "decision_id": meta(ok)["decision_id"]}
    denied = await check(s, DENIED, "envoy/authz/allow")  # TestCheckDenyObjectDecision
    assert denied.status.code == 7
    assert pairs(denied.denied_response.headers) == [("baz", "taz"), ("foo", "bar")]
    assert denied.denied_response.body == "Unauthorized Request"
    assert denied.denied_response.status.code == 301


async def test_dry_run(servicer: Servicer) -> None:
    s = await servicer(OBJECT_DECISION, dry_run=["envoy/authz/allow"])
    denied = await check(s, DENIED, "envoy/authz/allow")  # TestCheckDenyWithDryRunObjectDecision
    assert denied.status.code == 0 and not denied.ok_response.headers
    # the policy's metadata is kept, as upstream; Legation adds dry_run: true
    assert meta(denied)["test"] == "foo" and meta(denied)["dry_run"] is True
    ok = await check(s, PARSED_PATH, "envoy/authz/allow")  # TestCheckAllowWithDryRunObject...
    assert ok.status.code == 0
    assert pairs(ok.ok_response.headers) == [("x", "hello"), ("y", "world")]
    assert meta(ok)["bar"] == "baz"
    rbac = await servicer(RBAC, rule="result", dry_run=["envoy/authz/result"])
    assert (await check(rbac, DENIED, "envoy/authz/result")).status.code == 0  # ...DryRunTrue
    assert (await check(rbac, ALLOWED, "envoy/authz/result")).status.code == 0


async def test_spiffe_decision(servicer: Servicer) -> None:
    s = await servicer(SPIFFE, rule="result")
    with_id = {
        **PARSED_BODY,
        "attributes": {
            **PARSED_BODY["attributes"],
            "source": {"principal": "spiffe://test-domain/test"},
        },
    }
    assert (await check(s, with_id, "envoy/authz/result")).status.code == 0  # ...AllowWithSpiffe
    assert (await check(s, PARSED_BODY, "envoy/authz/result")).status.code == 7  # ...Deny...


async def test_truncated_body_decisions(servicer: Servicer) -> None:
    s = await servicer(TRUNCATED)
    cut = req(
        {
            "headers": {"content-type": "application/json", "content-length": "100000"},
            "body": BODY_62,
        }
    )
    whole = req(
        {"headers": {"content-type": "application/json", "content-length": "62"}, "body": BODY_62}
    )
    assert (await check(s, cut, "envoy/authz/allow")).status.code == 7  # ...TruncatedBody...
    assert (await check(s, whole, "envoy/authz/allow")).status.code == 0
    # TestCheckAllowDecisionWithSkipRequestBodyParse: no truncated_body, an invalid body is fine
    skip = await servicer(TRUNCATED, options=InputOptions(skip_body_parse=True))
    assert (await check(skip, INVALID, "envoy/authz/allow")).status.code == 0


# (upstream test, module, entry point, result field checks)
MODULE_CASES: list[tuple[str, str, str, Callable[[Any], None]]] = [
    (
        "TestCheckAllowObjectDecisionDynamicMetadata",
        ON_PATH
        + """
dynamic_metadata["foo"] = "bar"
dynamic_metadata["bar"] = "baz"
result["allowed"] = allow
result["dynamic_metadata"] = dynamic_metadata
""",
        "envoy/authz/result",
        lambda r: meta(r) == {"foo": "bar", "bar": "baz", "decision_id": meta(r)["decision_id"]},
    ),
    (
        "TestCheckAllowBooleanDecisionDynamicMetadata",
        ON_PATH,
        "envoy/authz/allow",
        lambda r: set(meta(r)) == {"decision_id"},
    ),
    (
        "TestCheckAllowObjectDecisionReqHeadersToRemove",
        ON_PATH
        + """
headers["x"] = "hello"
headers["y"] = "world"
request_headers_to_remove := ["foo", "bar"]
result["allowed"] = allow
result["headers"] = headers
result["request_headers_to_remove"] = request_headers_to_remove
""",
        "envoy/authz/result",
        lambda r: list(r.ok_response.headers_to_remove) == ["foo", "bar"],
    ),
    (
        "TestCheckAllowObjectDecisionResponseHeadersToAdd",
        ON_PATH
        + """
response_headers_to_add["x"] = "hello"
response_headers_to_add["y"] = "world"
result["allowed"] = allow
result["response_headers_to_add"] = response_headers_to_add
""",
        "envoy/authz/result",
        lambda r: pairs(r.ok_response.response_headers_to_add) == [("x", "hello"), ("y", "world")],
    ),
    (
        "TestCheckAllowObjectDecisionMultiValuedHeaders",
        ON_PATH
        + """
response_headers_to_add["x"] = ["hello", "world"]
result["allowed"] = allow
result["response_headers_to_add"] = response_headers_to_add
""",
        "envoy/authz/result",
        lambda r: (
            [(h.header.key, h.header.value) for h in r.ok_response.response_headers_to_add]
            == [("x", "hello"), ("x", "world")]
            and not r.ok_response.headers
        ),
    ),
    (
        "TestCheckAllowObjectDecisionReqQueryParamsToRemove",
        """package envoy.authz
default allow = true
query_parameters_to_remove := ["foo", "bar"]
result["allowed"] = allow
result["query_parameters_to_remove"] = query_parameters_to_remove
""",
        "envoy/authz/result",
        lambda r: list(r.ok_response.query_parameters_to_remove) == ["foo", "bar"],
    ),
    (
        "TestCheckAllowObjectDecisionReqQueryParamsToSet",
        """package envoy.authz
default allow = true
query_parameters_to_set := {"foo": "value1", "bar": ["value2", "value3"]}
result["allowed"] = allow
result["query_parameters_to_set"] = query_parameters_to_set
""",
        "envoy/authz/result",
        lambda r: (
            sorted((q.key, q.value) for q in r.ok_response.query_parameters_to_set)
            == [("bar", "value2"), ("bar", "value3"), ("foo", "value1")]
        ),
    ),
    (
        "TestVersionInfoInputV3",
        """package envoy.authz
allow if {
	input.version.ext_authz == "v3"
	input.version.encoding == "protojson"
}
""",
        "envoy/authz/allow",
        lambda r: r.status.code == 0,
    ),
]


@pytest.mark.parametrize(
    ("module", "entry", "expect"), [c[1:] for c in MODULE_CASES], ids=[c[0] for c in MODULE_CASES]
)
async def test_module_cases(
    servicer: Servicer, module: str, entry: str, expect: Callable[[Any], bool]
) -> None:
    s = await servicer(module, rule=entry.rsplit("/", 1)[1])
    request = ALLOWED if "Query" in module or "version" in module else PARSED_PATH
    r = await check(s, request, entry)
    assert r.status.code == 0
    assert expect(r)


# (upstream test, module, entry point): upstream answers a gRPC error; Legation a denial with
# its error_status (403 by default, as Envoy's status_on_error) and a named error
ERROR_CASES = [
    (
        "TestCheckIllegalDecisionWithLogger",
        "package envoy.authz\n\ndefault allow = 1\n",
        "envoy/authz/allow",
        "invalid_policy_result",
    ),
    (
        "TestCheckAllowObjectDecisionWithBadReqHeadersToRemoveWithLogger",
        ON_PATH
        + """
headers["x"] = "hello"
request_headers_to_remove := "foo"
result["allowed"] = allow
result["headers"] = headers
result["request_headers_to_remove"] = request_headers_to_remove
""",
        "envoy/authz/result",
        "invalid_policy_result",
    ),
    (
        "TestCheckEvalErrorWithLogger: a conflict",
        """package envoy.authz
default allow := false
allow := input.parsed_path[0] if input.parsed_path[0]
allow := "other" if input.parsed_path[0]
""",
        "envoy/authz/allow",
        "policy_error",
    ),
]


@pytest.mark.parametrize(
    ("module", "entry", "code"), [c[1:] for c in ERROR_CASES], ids=[c[0] for c in ERROR_CASES]
)
async def test_policy_errors_fail_closed(
    servicer: Servicer, module: str, entry: str, code: str
) -> None:
    s = await servicer(module, rule=entry.rsplit("/", 1)[1])
    r = await check(s, PARSED_PATH, entry)
    assert r.status.code == 7 and r.denied_response.status.code == 403
    assert code in r.denied_response.body


async def test_undefined_decision_denies(servicer: Servicer) -> None:
    """Deliberate difference: upstream errors on an undefined decision (Envoy then applies
    status_on_error, 403 by default); Legation denies with its deny_status (403)."""
    s = await servicer('package envoy.authz\n\nallow if input.parsed_path[0] == "yes"\n')
    r = await check(s, PARSED_PATH, "envoy/authz/allow")
    assert r.status.code == 7 and r.denied_response.status.code == 403
