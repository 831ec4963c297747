"""Schema-pass messages: one per problem, each naming the file and the field path."""

from __future__ import annotations

from typing import Any

import pytest

from legation.config import MeshConfigError, parse_mesh
from tests.config.meshdata import base, parse


def error_of(data: dict[str, Any]) -> str:
    with pytest.raises(MeshConfigError) as info:
        parse(data)
    return str(info.value)


def test_unknown_top_level_key_lists_allowed_keys() -> None:
    data = base()
    data["servics"] = []
    assert error_of(data) == (
        "mesh.yaml: servics: unknown key (allowed: accesslog, capture, extauthz, extproc, "
        "gateway, mtls, path_normalization, ratelimit, routes, services, tracing, xds)"
    )


def test_several_problems_one_per_line() -> None:
    data = base()
    data["services"][1]["protocol"] = "udp"
    data["services"][1]["port"] = 70000
    del data["routes"][0]["name"]
    assert error_of(data).splitlines() == [
        "mesh.yaml: services[1].port: must be <= 65535, got 70000",
        "mesh.yaml: services[1].protocol: expected 'http', 'grpc' or 'tcp', got 'udp'",
        "mesh.yaml: routes[0].name: missing required key",
    ]


def test_non_string_label_hints_at_quoting() -> None:
    data = base()
    data["services"][0]["endpoints"][0]["labels"]["version"] = 2
    assert error_of(data) == (
        "mesh.yaml: services[0].endpoints[0].labels.version: expected a string, got 2 "
        "(quote it in YAML)"
    )


def test_bad_name_pattern() -> None:
    data = base()
    data["services"][1]["name"] = "Ratings"
    assert error_of(data).splitlines()[0] == (
        "mesh.yaml: services[1].name: expected a lower-case name (letters, digits and '-', "
        "not at either end), got 'Ratings'"
    )


@pytest.mark.parametrize(
    ("route", "message"),
    [
        (
            {"to": {"service": "reviews"}, "redirect": {"path": "/x"}},
            (
                "routes[0]: give exactly one of to, split, redirect, direct_response "
                "(got to, redirect)"
            ),
        ),
        (
            {"direct_response": {"status": 200}, "match": {"path": {}}},
            "routes[0].match.path: give exactly one of prefix, exact, regex",
        ),
        (
            {"direct_response": {"status": 200}, "match": {"path": {"prefix": "api"}}},
            "routes[0].match.path.prefix: must start with '/', got 'api'",
        ),
        (
            {
                "direct_response": {"status": 200},
                "match": {"headers": [{"name": "x", "exact": "a", "present": True}]},
            },
            "routes[0].match.headers[0]: give exactly one of exact, prefix, regex, present "
            "(got exact, present)",
        ),
        (
            {"direct_response": {"status": 200}, "match": {"methods": ["FETCH"]}},
            "routes[0].match.methods[0]: expected 'GET', 'HEAD', 'POST', 'PUT', 'DELETE', 'PATCH', "
            "'OPTIONS', 'CONNECT' or 'TRACE', got 'FETCH'",
        ),
        (
            {"to": {"service": "reviews"}, "fault": {}},
            "routes[0].fault: give a delay, an abort or both",
        ),
        (
            {"to": {"service": "reviews"}, "fault": {"abort": {"percent": 150, "status": 503}}},
            "routes[0].fault.abort.percent: must be <= 100, got 150",
        ),
        (
            {"to": {"service": "reviews"}, "retries": {"attempts": 0}},
            "routes[0].retries.attempts: must be >= 1, got 0",
        ),
        (
            {"to": {"service": "reviews"}, "split": None, "rate_limits": [{"actions": [{}]}]},
            (
                "routes[0].rate_limits[0].actions[0]: give exactly one of generic_key, "
                "request_headers, remote_address, jwt_claim"
            ),
        ),
    ],
)
def test_route_shape_errors(route: dict[str, Any], message: str) -> None:
    data = base()
    data["routes"] = [{"name": "r", **route}]
    assert error_of(data) == f"mesh.yaml: {message}"


def test_ring_hash_needs_a_header() -> None:
    data = base()
    data["services"][0]["load_balancer"] = {"policy": "ring_hash"}
    assert error_of(data) == (
        "mesh.yaml: services[0].load_balancer: ring_hash needs hash_header "
        "(the request header to hash on)"
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "(top level): the file is empty; expected a mapping"),
        ("- a\n- b\n", "(top level): expected a mapping, got a list"),
        (
            "services: []\nservices: []\n",
            "(top level): invalid YAML at line 2, column 1: duplicate key 'services'",
        ),
    ],
)
def test_document_level_errors(text: str, message: str) -> None:
    with pytest.raises(MeshConfigError) as info:
        parse_mesh(text, source="m.yaml")
    assert str(info.value) == f"m.yaml: {message}"
