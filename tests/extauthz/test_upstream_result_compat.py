"""Result document -> CheckResponse, case by case against opa-envoy-plugin.

Cases retyped from opa-envoy-plugin's ``envoyauth/response_test.go`` (``TestIsAllowed``,
``TestGetRequestQueryParametersToRemove``, ``TestGetQueryParametersToSet``,
``TestGetRequestHTTPHeadersToRemove``, ``TestGetResponseHTTPHeadersToAdd``,
``TestGetResponseHeaderValueOptions``, ``TestGetResponseBody``, ``TestGetResponseHttpStatus``,
``TestGetDynamicMetadata``) and the response assembly in ``internal/internal.go`` (``check``).
Each row names the case it mirrors; deliberate differences say so.
"""

from __future__ import annotations

from typing import Any

import pytest
from envoy.config.core.v3 import base_pb2
from google.protobuf.json_format import MessageToDict

from legation.extauthz.errors import AuthzError
from legation.extauthz.response import decision_from_result, to_check_response

OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
APPEND = base_pb2.HeaderValueOption.APPEND_IF_EXISTS_OR_ADD


def respond(result: Any) -> Any:
    decision = decision_from_result(result, where="p")
    return to_check_response(decision, decision_id="d1", deny_status=403)


def pairs(options: Any) -> list[tuple[str, str]]:
    return [(o.header.key, o.header.value) for o in options]


# (upstream case, result) -> the result is a policy error
INVALID = [
    ("TestIsAllowed: no allowed", {}),
    ("TestIsAllowed: allowed is a number", {"allowed": 1}),
    ("invalidDecisionErr: a string decision", "hello"),
    ("TestCheckIllegalDecisionWithLogger: a number decision", 1),
    (
        "TestGetRequestQueryParametersToRemove bad_param_value",
        {"allowed": True, "query_parameters_to_remove": "test"},
    ),
    (
        "TestGetRequestQueryParametersToRemove interface_array_bad_param_value",
        {"allowed": True, "query_parameters_to_remove": [1]},
    ),
    (
        "TestGetQueryParametersToSet invalid_type",
        {"allowed": True, "query_parameters_to_set": "invalid"},
    ),
    (
        "TestGetQueryParametersToSet invalid_value_type",
        {"allowed": True, "query_parameters_to_set": {"test": 123}},
    ),
    (
        "TestGetQueryParametersToSet invalid_array_value_type",
        {"allowed": True, "query_parameters_to_set": {"test": [123]}},
    ),
    (
        "TestGetRequestHTTPHeadersToRemove bad_header_value",
        {"allowed": True, "request_headers_to_remove": "test"},
    ),
    (
        "TestGetRequestHTTPHeadersToRemove interface_array_bad_header_value",
        {"allowed": True, "request_headers_to_remove": [1]},
    ),
    (
        "TestGetRequestHTTPHeadersToRemove type_assertion_error",
        {"allowed": True, "request_headers_to_remove": 1},
    ),
    (
        "TestGetResponseHTTPHeadersToAdd: a string",
        {"allowed": True, "response_headers_to_add": "test"},
    ),
    (
        "TestGetResponseHTTPHeadersToAdd: a number value",
        {"allowed": True, "response_headers_to_add": {"foo": "bar", "baz": 1}},
    ),
    ("TestGetResponseHeaderValueOptions: a string", {"allowed": True, "headers": "test"}),
    (
        "TestGetResponseHeaderValueOptions: a number value",
        {"allowed": True, "headers": {"foo": "bar", "baz": 1}},
    ),
    ("transformAnyInputToHeadersBag: a list holding a string", {"allowed": True, "headers": ["x"]}),
    ("TestGetResponseBody: a number body", {"allowed": False, "body": 123}),
    ("TestGetResponseHttpStatus: a boolean", {"allowed": False, "http_status": True}),
    ("TestGetResponseHttpStatus: 1", {"allowed": False, "http_status": 1}),
    ("TestGetResponseHttpStatus: 9999", {"allowed": False, "http_status": 9999}),
    ("GetResponseHTTPStatus: a non-integral number", {"allowed": False, "http_status": 301.5}),
    ("TestGetDynamicMetadata: a number", {"allowed": True, "dynamic_metadata": 123}),
    # deliberate difference: upstream reads only the fields of the branch taken; Legation
    # refuses a malformed field whichever the branch (fail closed on a policy bug)
    (
        "(differs) a denial with a malformed query_parameters_to_set",
        {"allowed": False, "query_parameters_to_set": "x"},
    ),
    ("(differs) an allow with a malformed http_status", {"allowed": True, "http_status": 999}),
    # hardening beyond upstream: no control characters reach Envoy
    (
        "(Legation) a CR/LF in a query parameter",
        {"allowed": True, "query_parameters_to_set": {"a": "1\r\nx: y"}},
    ),
]


@pytest.mark.parametrize("result", [c[1] for c in INVALID], ids=[c[0] for c in INVALID])
def test_malformed_results_are_policy_errors(result: Any) -> None:
    with pytest.raises(AuthzError) as err:
        decision_from_result(result, where="p")
    assert err.value.code == "invalid_policy_result"


def test_boolean_results() -> None:
    """TestIsAllowed / check(): a boolean is the decision; only decision_id in metadata."""
    allow, deny = respond(True), respond(False)
    assert allow.status.code == 0 and deny.status.code == 7
    assert MessageToDict(allow.dynamic_metadata) == {"decision_id": "d1"}
    assert MessageToDict(deny.dynamic_metadata) == {"decision_id": "d1"}
    assert deny.denied_response.status.code == 403  # Envoy's default for a bare denial


# (upstream case, query_parameters_to_remove, expected)
QUERY_REMOVE = [
    ("empty_map_result", None, []),
    ("string_array_param_value", ["foo", "bar"], ["foo", "bar"]),
    ("interface_array_param_value", ["foo", "bar", "fuz"], ["foo", "bar", "fuz"]),
]


@pytest.mark.parametrize(
    ("value", "expected"), [c[1:] for c in QUERY_REMOVE], ids=[c[0] for c in QUERY_REMOVE]
)
def test_query_parameters_to_remove(value: Any, expected: list[str]) -> None:
    result: dict[str, Any] = {"allowed": True}
    if value is not None:
        result["query_parameters_to_remove"] = value
    ok = respond(result).ok_response
    assert list(ok.query_parameters_to_remove) == expected


# (upstream TestGetQueryParametersToSet case, query_parameters_to_set, expected pairs)
QUERY_SET = [
    ("empty_map_result", {}, []),
    (
        "single_value",
        {"param1": "value1", "param2": "value2"},
        [("param1", "value1"), ("param2", "value2")],
    ),
    (
        "array_values",
        {"param1": ["value1", "value2"], "param2": ["value3", "value4"]},
        [("param1", "value1"), ("param1", "value2"), ("param2", "value3"), ("param2", "value4")],
    ),
    (
        "mixed_values",
        {"param1": "single", "param2": ["multi1", "multi2"]},
        [("param1", "single"), ("param2", "multi1"), ("param2", "multi2")],
    ),
]


@pytest.mark.parametrize(
    ("value", "expected"), [c[1:] for c in QUERY_SET], ids=[c[0] for c in QUERY_SET]
)
def test_query_parameters_to_set(value: dict[str, Any], expected: list[tuple[str, str]]) -> None:
    ok = respond({"allowed": True, "query_parameters_to_set": value}).ok_response
    assert sorted((q.key, q.value) for q in ok.query_parameters_to_set) == sorted(expected)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (["foo", "bar"], ["foo", "bar"]),  # string_array_header_value
        (["foo", "bar", "fuz"], ["foo", "bar", "fuz"]),  # interface_array_header_value
    ],
)
def test_request_headers_to_remove(value: list[str], expected: list[str]) -> None:
    assert (
        list(
            respond(
                {"allowed": True, "request_headers_to_remove": value}
            ).ok_response.headers_to_remove
        )
        == expected
    )


# (upstream case, field value, expected (name, value) entries) for headers and
# response_headers_to_add: an object, a list of objects, list values -> one entry per value
HEADER_SHAPES = [
    ("TestGetResponseHeaderValueOptions: empty", {}, []),
    ("TestGetResponseHeaderValueOptions: one", {"foo": "bar"}, [("foo", "bar")]),
    (
        "TestGetResponseHeaderValueOptions: list of objects",
        [{"foo": "bar"}, {"foo": "baz"}],
        [("foo", "bar"), ("foo", "baz")],
    ),
    (
        "TestGetResponseHeaderValueOptions: list value",
        {"foo": ["bar", "baz"]},
        [("foo", "bar"), ("foo", "baz")],
    ),
    (
        "(response.go) several Set-Cookie",
        [{"set-cookie": "a=1"}, {"set-cookie": "b=2"}],
        [("set-cookie", "a=1"), ("set-cookie", "b=2")],
    ),
]


@pytest.mark.parametrize(
    ("value", "expected"), [c[1:] for c in HEADER_SHAPES], ids=[c[0] for c in HEADER_SHAPES]
)
def test_header_shapes(value: Any, expected: list[tuple[str, str]]) -> None:
    allowed = respond({"allowed": True, "headers": value, "response_headers_to_add": value})
    denied = respond({"allowed": False, "headers": value})
    assert sorted(pairs(allowed.ok_response.headers)) == sorted(expected)
    assert sorted(pairs(allowed.ok_response.response_headers_to_add)) == sorted(expected)
    assert sorted(pairs(denied.denied_response.headers)) == sorted(expected)


def test_header_append_actions() -> None:
    """Legation sets the append action explicitly (upstream leaves Envoy's default): a header to
    the upstream replaces the client's, its further values are appended; a response header is
    appended (upstream's default), so two Set-Cookie both reach the client."""
    ok = respond(
        {
            "allowed": True,
            "headers": {"x-user": ["a", "b"]},
            "response_headers_to_add": {"set-cookie": ["a=1", "b=2"]},
        }
    ).ok_response
    assert [h.append_action for h in ok.headers] == [OVERWRITE, APPEND]
    assert [h.append.value for h in ok.headers] == [False, True]  # what Envoy reads there
    assert [h.append_action for h in ok.response_headers_to_add] == [APPEND, APPEND]
    denied = respond({"allowed": False, "headers": {"set-cookie": ["a=1", "b=2"]}})
    assert [h.append_action for h in denied.denied_response.headers] == [OVERWRITE, APPEND]


def test_denied_object() -> None:
    """TestCheckDenyObjectDecision: headers, body and status of a denial; dynamic metadata."""
    r = respond(
        {
            "allowed": False,
            "headers": {"foo": "bar", "baz": "taz"},
            "body": "Unauthorized Request",
            "http_status": 301,
            "dynamic_metadata": {"test": "foo", "bar": "baz"},
        }
    )
    assert r.status.code == 7
    assert sorted(pairs(r.denied_response.headers)) == [("baz", "taz"), ("foo", "bar")]
    assert r.denied_response.body == "Unauthorized Request"
    assert r.denied_response.status.code == 301
    assert MessageToDict(r.dynamic_metadata) == {"test": "foo", "bar": "baz", "decision_id": "d1"}


def test_status_body_defaults() -> None:
    """TestGetResponseHttpStatus / TestGetResponseBody: 403 and "" unless given; 400 is ok."""
    assert respond({"allowed": False}).denied_response.status.code == 403
    assert respond({"allowed": False}).denied_response.body == ""
    assert respond({"allowed": False, "http_status": 400}).denied_response.status.code == 400
    assert respond({"allowed": False, "body": "hello"}).denied_response.body == "hello"


def test_dynamic_metadata_and_decision_id() -> None:
    """TestGetDynamicMetadata / TestCheckAllowObjectDecisionDynamicMetadata(DecisionID): the
    policy's object as a Struct, plus decision_id (which the policy cannot override)."""
    r = respond({"allowed": True, "dynamic_metadata": {"foo": "bar", "decision_id": "mine"}})
    assert MessageToDict(r.dynamic_metadata) == {"foo": "bar", "decision_id": "d1"}
    assert MessageToDict(respond({"allowed": True}).dynamic_metadata) == {"decision_id": "d1"}


def test_allowed_object_carries_every_mutation() -> None:
    """testAuthzServer's result object: every mutation of an allow reaches the OkHttpResponse."""
    ok = respond(
        {
            "allowed": True,
            "headers": {"foo": "bar", "baz": "qux"},
            "request_headers_to_remove": ["foo", "bar", "baz", "qux"],
            "query_parameters_to_remove": ["foo", "bar", "baz", "qux"],
            "query_parameters_to_set": {"foo": "bar", "baz": ["qux", "quux"]},
            "response_headers_to_add": {"foo": "bar", "baz": "qux"},
        }
    ).ok_response
    assert sorted(pairs(ok.headers)) == [("baz", "qux"), ("foo", "bar")]
    assert list(ok.headers_to_remove) == ["foo", "bar", "baz", "qux"]
    assert list(ok.query_parameters_to_remove) == ["foo", "bar", "baz", "qux"]
    assert sorted((q.key, q.value) for q in ok.query_parameters_to_set) == [
        ("baz", "quux"),
        ("baz", "qux"),
        ("foo", "bar"),
    ]
    assert sorted(pairs(ok.response_headers_to_add)) == [("baz", "qux"), ("foo", "bar")]
