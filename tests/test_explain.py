"""``legation explain``: per route, the services called, over HTTP or gRPC, hops, and why; the
answer agrees with the route's own config in the translated snapshot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from envoy.extensions.filters.http.ext_authz.v3 import ext_authz_pb2
from envoy.extensions.filters.http.ext_proc.v3 import ext_proc_pb2

from legation.cli import main
from legation.explain import explain
from legation.translate import translate
from tests.config.meshdata import parse
from tests.translate.test_services import (
    AUTHZ,
    HTTP_AUTHZ,
    JWT_LIMIT,
    PROC,
    http_mesh,
    per_route,
    routes_of,
)

FILTER = [
    {
        "name": "header_route",
        "options": {
            "header": "x-cohort",
            "rules": [{"header": "x-user", "one_of": ["alice"], "value": "beta"}],
        },
    }
]
KINDS = [
    {"name": "fast", "to": {"service": "ratings"}, "authz": "a.b"},
    {"name": "pinned", "to": {"service": "ratings"}, "authz": "a.b", "authz_protocol": "grpc"},
    {"name": "claims", "to": {"service": "ratings"}, "authz": "a.b", "rate_limits": [JWT_LIMIT]},
    {"name": "chain", "to": {"service": "ratings"}, "filters": FILTER},
    {"name": "plain", "mesh_hosts": ["ratings"], "to": {"service": "ratings"}},
]


def mesh_data() -> dict[str, Any]:
    return http_mesh(*KINDS)


def test_a_route_of_each_kind() -> None:
    by_route = {e["route"]: e for e in explain(parse(mesh_data()))}
    summary = {name: (e["hops"], e["http"], e["grpc"]) for name, e in by_route.items()}
    assert summary == {
        "guarded": (3, 1, 2),  # authz over HTTP, ext_proc and the rate limit over gRPC
        "open": (0, 0, 0),
        "fast": (1, 1, 0),
        "pinned": (1, 0, 1),
        "claims": (2, 0, 2),
        "chain": (1, 0, 1),
        "plain": (0, 0, 0),
    }
    authz = {name: e["services"][0] for name, e in by_route.items()}
    assert authz["fast"] == {
        "service": "extauthz",
        "calls": True,
        "protocol": "http",
        "filter": HTTP_AUTHZ,
        "cluster": "legation|extauthz-http",
        "reason": "policy a.b; extauthz.protocol is http and the route needs nothing HTTP mode "
        "lacks",
    }
    assert authz["pinned"]["reason"] == "policy a.b; the route sets authz_protocol: grpc"
    assert authz["claims"]["reason"] == (
        "policy a.b; rate_limits read jwt_claim sub from ext_authz's structured dynamic "
        "metadata, which HTTP mode does not carry"
    )
    assert authz["plain"] == {
        "service": "extauthz",
        "calls": False,
        "protocol": None,
        "filter": None,
        "cluster": None,
        "reason": "the route has no authz",
    }
    assert by_route["plain"]["applies_on"] == ["sidecars calling ratings"]
    assert by_route["guarded"]["applies_on"] == ["gateway", "sidecars calling reviews"]


def test_explain_is_what_the_proxies_got() -> None:
    mesh = parse(mesh_data())
    routes = routes_of(translate(mesh, version="v1")["gateway-ingress"], "gateway")
    for entry in explain(mesh):
        if "gateway" not in entry["applies_on"]:
            continue
        route = routes[entry["route"]]
        on = {s["filter"] for s in entry["services"] if s["calls"]}
        for name in (AUTHZ, HTTP_AUTHZ):
            disabled = per_route(route, name, ext_authz_pb2.ExtAuthzPerRoute).disabled
            assert disabled == (name not in on), (entry["route"], name)
        proc = per_route(route, PROC, ext_proc_pb2.ExtProcPerRoute)
        assert proc.disabled == (PROC not in on), entry["route"]
        assert bool(route.route.rate_limits) == any(
            s["calls"] for s in entry["services"] if s["service"] == "ratelimit"
        )


def test_cli_text_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "mesh.yaml"
    path.write_text(yaml.safe_dump(mesh_data()))
    assert main(["explain", "fast", "--mesh", str(path)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "route fast: 1 hop (1 HTTP, 0 gRPC), on the gateway",
        "  extauthz   HTTP  legation.ext_authz.http -> legation|extauthz-http: policy a.b; "
        "extauthz.protocol is http and the route needs nothing HTTP mode lacks",
        "  extproc    -     no call: the route has no filters",
        "  ratelimit  -     no call: the route has no rate_limits",
    ]
    assert main(["explain", "--json", "--mesh", str(path)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["mesh"] == str(path)
    assert [r["route"] for r in out["routes"]] == ["guarded", "open", *(k["name"] for k in KINDS)]
    assert main(["explain", "nope", "--mesh", str(path)]) == 2
    assert capsys.readouterr().err == (
        f"{path}: no route 'nope' (routes: guarded, open, fast, pinned, claims, chain, plain)\n"
    )
