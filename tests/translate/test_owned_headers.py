"""A header only a ``header_route`` filter may set is removed from the client's request before
Envoy picks a route (early header mutation), on the gateway and on sidecar outbound listeners.

Without it a client sending ``x-cohort: beta`` lands on a route matching that header when the route
does not itself run the filter deciding it (found by an attacker review). Checked in the
translated config and through the real Envoy.
"""

from __future__ import annotations

import json
import re
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from envoy.extensions.http.early_header_mutation.header_mutation.v3 import (
    header_mutation_pb2 as early_pb2,
)
from hypothesis import given
from hypothesis import strategies as st

from legation.demo import DemoApp
from legation.envoy_process import EnvoyProcess
from legation.translate import translate
from legation.translate.static import static_bootstrap
from legation.xds.types import ResourceType
from tests.config.meshdata import base, parse
from tests.conftest import free_port
from tests.translate.test_mesh import hcm_of, message

COHORT = {
    "name": "header_route",
    "options": {
        "header": "x-cohort",
        "rules": [{"header": "x-user", "one_of": ["alice"], "value": "beta"}],
    },
}


def _mesh(v1: int, v2: int, gw: int, admin: int, filters: list[dict[str, Any]]) -> dict[str, Any]:
    data = base()
    data["gateway"] = {"port": gw, "admin_port": admin}
    data["services"][0]["endpoints"] = [
        {"port": v1, "labels": {"version": "v1"}},
        {"port": v2, "labels": {"version": "v2"}},
    ]
    # ext_proc is never started: the filter fails open, so only the client's header could route
    data["extproc"] = {"port": free_port(), "embedded": False, "failure_mode": "open"}
    data["routes"] = [
        {
            "name": "beta",  # matches the header and runs no filter: the client's way in
            "match": {"path": {"prefix": "/"}, "headers": [{"name": "x-cohort", "exact": "beta"}]},
            "to": {"service": "reviews", "subset": "v2"},
        },
        {
            "name": "main",
            "match": {"path": {"prefix": "/"}},
            "to": {"service": "reviews", "subset": "v1"},
            "filters": filters,
        },
    ]
    return data


def _removed(hcm: Any) -> list[str]:
    out = []
    for ext in hcm.early_header_mutation_extensions:
        mutation = early_pb2.HeaderMutation()
        assert ext.typed_config.Unpack(mutation)
        out += [m.remove for m in mutation.mutations]
    return out


def test_gateway_and_outbound_strip_what_header_route_sets_inbound_does_not() -> None:
    data = _mesh(9111, 9112, 8080, 19000, [COHORT])
    data["services"][0]["endpoints"][0]["sidecar"] = {
        "inbound_port": 15111,
        "outbound_port": 15211,
        "admin_port": 19011,
    }
    out = translate(parse(data), version="v1")
    gateway = hcm_of(message(out["gateway-ingress"], ResourceType.LISTENER, "gateway"))
    assert _removed(gateway) == ["x-cohort"]
    sidecar = out["sidecar-reviews-0"]
    assert _removed(hcm_of(message(sidecar, ResourceType.LISTENER, "outbound"))) == ["x-cohort"]
    assert _removed(hcm_of(message(sidecar, ResourceType.LISTENER, "inbound"))) == []


def test_no_header_route_no_mutation_and_a_header_a_rule_reads_is_kept() -> None:
    plain = translate(parse(_mesh(9111, 9112, 8080, 19000, [])), version="v1")
    gateway = hcm_of(message(plain["gateway-ingress"], ResourceType.LISTENER, "gateway"))
    assert _removed(gateway) == []
    reads_own = {
        "name": "header_route",
        "options": {
            "header": "x-cohort",
            "rules": [{"header": "x-cohort", "equals": "beta", "value": "beta"}],
        },
    }
    kept = translate(parse(_mesh(9111, 9112, 8080, 19000, [reads_own])), version="v1")
    gateway = hcm_of(message(kept["gateway-ingress"], ResourceType.LISTENER, "gateway"))
    assert _removed(gateway) == []  # that mesh routes on the client's value by design


@pytest.fixture(scope="module")
def gateway() -> Iterator[int]:
    apps = [DemoApp(name="reviews", version=v).start_in_thread() for v in ("v1", "v2")]
    gw, admin = free_port(), free_port()
    mesh = parse(_mesh(apps[0].port, apps[1].port, gw, admin, [COHORT]))
    snapshot = translate(mesh, version="t1")["gateway-ingress"]
    envoy = EnvoyProcess(
        static_bootstrap(snapshot, node_id="gateway-ingress", admin_port=admin),
        admin_port=admin,
        name="owned-headers",
    ).start()
    try:
        envoy.wait_live()
        yield gw
    finally:
        envoy.stop()
        for app in apps:
            app.stop_thread()


def _version(port: int, headers: dict[str, str]) -> str:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/reviews", headers=headers)
    with urllib.request.urlopen(request, timeout=10) as reply:
        return str(json.loads(reply.read())["version"])


@pytest.mark.integration
@pytest.mark.parametrize("spelling", ["x-cohort", "X-Cohort", "X-COHORT"])
def test_a_client_cannot_pick_the_header_routed_route(gateway: int, spelling: str) -> None:
    assert _version(gateway, {}) == "v1"
    assert _version(gateway, {spelling: "beta"}) == "v1"
    assert _version(gateway, {spelling: "beta", "x-user": "mallory"}) == "v1"


@pytest.mark.integration
def test_an_underscore_spelling_never_reaches_the_app(gateway: int) -> None:
    """``x_cohort`` is not ``x-cohort`` to Envoy, but is to CGI/WSGI apps: dropped at the edge."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{gateway}/reviews", headers={"x_cohort": "beta", "x-keep": "1"}
    )
    with urllib.request.urlopen(request, timeout=10) as reply:
        seen = json.loads(reply.read())
    assert seen["version"] == "v1"
    headers = {k.lower() for k in seen.get("headers", {})}
    assert "x_cohort" not in headers and "x-keep" in headers, headers


@given(st.from_regex(r"[A-Za-z0-9._-]{1,30}", fullmatch=True))
def test_a_sidecar_accepts_any_workload_name_but_legations_services(name: str) -> None:
    """The inbound SAN pattern (RE2 has no lookahead) accepts exactly the names that do not
    start with ``legation-``, in the mesh's trust domain, one segment."""
    from legation.translate._mtls import workload_peer

    pattern = workload_peer("cluster.local").safe_regex.regex
    uri = f"spiffe://cluster.local/ns/default/sa/{name}"
    assert bool(re.match(pattern, uri)) is (not name.startswith("legation-"))
    assert not re.match(pattern, f"spiffe://other.local/ns/default/sa/{name}")
    assert not re.match(pattern, f"{uri}/x")
