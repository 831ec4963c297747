"""Semantic-pass messages: references, duplicates, ports, weights, misplaced settings."""

from __future__ import annotations

from typing import Any

import pytest

from legation.config import MeshConfigError
from tests.config.meshdata import base, parse


def errors_of(data: dict[str, Any]) -> list[str]:
    with pytest.raises(MeshConfigError) as info:
        parse(data)
    assert [p.render("mesh.yaml") for p in info.value.problems] == str(info.value).splitlines()
    return str(info.value).splitlines()


def with_route(**route: Any) -> dict[str, Any]:
    data = base()
    data["routes"] = [{"name": "r", **route}]
    return data


def test_duplicate_service_and_instance_names() -> None:
    data = base()
    data["services"][1]["name"] = "reviews"
    data["services"][1]["endpoints"][0]["name"] = "reviews-1"
    assert errors_of(data) == [
        "mesh.yaml: services[1].name: duplicate service name 'reviews' (first at services[0].name)",
        "mesh.yaml: services[1].endpoints[0].name: duplicate instance name 'reviews-1' "
        "(first at services[0].endpoints[1])",
    ]


def test_duplicate_subset_and_empty_subset() -> None:
    data = base()
    data["services"][0]["subsets"].append({"name": "v1", "labels": {"version": "v9"}})
    assert errors_of(data) == [
        "mesh.yaml: services[0].subsets[2].name: duplicate subset name 'v1' "
        "(first at services[0].subsets[0].name)",
        "mesh.yaml: services[0].subsets[2].labels: selects no endpoint of service 'reviews'",
    ]


def test_port_clashes_with_gateway_admin_and_xds() -> None:
    data = base()
    data["gateway"]["admin_port"] = 18000
    data["services"][1]["endpoints"][0]["port"] = 15211
    assert errors_of(data) == [
        "mesh.yaml: gateway.admin_port: port 18000 is already used by xds.port",
        "mesh.yaml: services[1].endpoints[0].port: port 15211 is already used by "
        "services[0].endpoints[0].sidecar.outbound_port",
    ]


def test_same_port_on_different_hosts_is_fine_but_not_on_wildcard() -> None:
    data = base()
    data["services"][1]["endpoints"][0].update(host="127.0.0.2", port=9111)
    parse(data)
    data["services"][1]["endpoints"][0]["host"] = "0.0.0.0"
    assert errors_of(data) == [
        "mesh.yaml: services[1].endpoints[0].port: port 9111 is already used by "
        "services[0].endpoints[0].port"
    ]


@pytest.mark.parametrize(
    ("route", "expected"),
    [
        (
            {"to": {"service": "reviews", "subset": "v3"}},
            ["routes[0].to.subset: service 'reviews' has no subset 'v3'"],
        ),
        (
            {
                "split": [
                    {"service": "reviews", "subset": "v1", "weight": 50},
                    {"service": "reviews", "subset": "v1", "weight": 50},
                ]
            },
            [
                "routes[0].split[1]: duplicate split destination name 'reviews/v1' "
                "(first at routes[0].split[0])"
            ],
        ),
        (
            {"split": [{"service": "nope", "weight": 100}]},
            ["routes[0].split[0].service: unknown service 'nope'"],
        ),
        (
            {"to": {"service": "reviews"}, "mirror": {"service": "shadow"}},
            ["routes[0].mirror.service: unknown service 'shadow'"],
        ),
        (
            {"to": {"service": "reviews"}, "mesh_hosts": ["reviewz"], "gateway": True},
            ["routes[0].mesh_hosts[0]: unknown service 'reviewz'"],
        ),
        (
            {"to": {"service": "reviews"}, "gateway": False},
            ["routes[0]: applies nowhere: set gateway: true or list mesh_hosts"],
        ),
        (
            {"direct_response": {"status": 204}, "timeout": "1s", "retries": {"attempts": 2}},
            [
                "routes[0].timeout: only applies to routes with 'to' or 'split'",
                "routes[0].retries: only applies to routes with 'to' or 'split'",
            ],
        ),
        (
            {"to": {"service": "reviews"}, "retries": {"attempts": 2, "budget": {"percent": 20}}},
            [
                "routes[0].retries.budget: a retry budget is a cluster setting: "
                "set it on the service"
            ],
        ),
        (
            {
                "to": {"service": "reviews"},
                "retries": {"attempts": 2, "retriable_status_codes": [409]},
            },
            [
                "routes[0].retries.retriable_status_codes: "
                "needs 'retriable-status-codes' in retry_on"
            ],
        ),
        (
            {"to": {"service": "reviews"}, "match": {"path": {"regex": "/(a"}}},
            [
                "routes[0].match.path.regex: invalid regular expression '/(a': "
                "missing ), unterminated subpattern at position 1"
            ],
        ),
        (
            {"to": {"service": "reviews"}, "match": {"query": [{"name": "q", "present": False}]}},
            [
                "routes[0].match.query[0]: "
                "query parameters support neither invert nor present: false"
            ],
        ),
        (
            {"to": {"service": "reviews"}, "headers": {"request": {"set": {"Host": "x"}}}},
            ["routes[0].headers.request: header 'Host' cannot be modified"],
        ),
        (
            {
                "to": {"service": "reviews"},
                "authz": "policy",
                "filters": [{"name": "headers", "options": {"request": {"set": {"x-a": "1"}}}}],
                "rate_limits": [{"actions": [{"remote_address": {}}]}],
            },
            [
                "routes[0].authz: needs an extauthz service (mesh-level 'extauthz')",
                "routes[0].filters: needs an extproc service (mesh-level 'extproc')",
                "routes[0].rate_limits: needs a rate-limit service (mesh-level 'ratelimit')",
            ],
        ),
    ],
)
def test_route_semantics(route: dict[str, Any], expected: list[str]) -> None:
    assert errors_of(with_route(**route)) == [f"mesh.yaml: {e}" for e in expected]


def test_authz_disabled_needs_no_service() -> None:
    assert parse(with_route(to={"service": "reviews"}, authz="disabled")).routes[0].authz


def test_gateway_route_without_gateway() -> None:
    data = base()
    del data["gateway"]
    assert errors_of(data) == [
        "mesh.yaml: routes[0]: the mesh declares no gateway (list mesh_hosts for mesh traffic)"
    ]
    data["routes"][0]["mesh_hosts"] = ["reviews"]
    assert parse(data).routes[0].on_gateway is False


def test_tcp_services_cannot_be_routed_to_or_given_http_policy() -> None:
    data = base()
    data["services"][1].update(protocol="tcp", timeout="1s")
    data["routes"][0]["to"] = {"service": "ratings"}
    assert errors_of(data) == [
        "mesh.yaml: services[1].timeout: applies to HTTP and gRPC services, not tcp",
        "mesh.yaml: routes[0].to.service: service 'ratings' is tcp; HTTP routes cannot reach it",
    ]
