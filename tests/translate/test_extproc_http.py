"""ext_proc over Envoy's HTTP transport in the translation: which routes use it, why the others
do not, and what each route's config says (``extproc: {protocol: http}``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from legation.config import load_mesh
from legation.explain import explain
from legation.extproc.http_server import chain_path
from legation.translate import _services
from legation.translate._extproc import EXTPROC_HTTP_CLUSTER, ExtProcSide
from tests.translate.test_fused import COHORT

HEADERS = [{"name": "headers", "options": {"request": {"set": {"x-a": "1"}}}}]
RESPONSE = [{"name": "headers", "options": {"response": {"set": {"x-a": "1"}}}}]
STATEFUL = [{"name": "request_id"}]  # echoes on the response the id its request hook kept
BODY = [{"name": "body_redact", "options": {"fields": ["x"]}}]


def mesh(tmp: Path, routes: list[dict[str, Any]], *, authz_http: bool = False) -> Any:
    doc: dict[str, Any] = {
        "extproc": {"port": 18041, "protocol": "http", "http_port": 18042, "workers": 2},
        "gateway": {"name": "gw", "port": 18044, "admin_port": 18045},
        "services": [{"name": "s", "port": 80, "endpoints": [{"port": 9000}]}],
        "routes": routes,
    }
    if authz_http:
        (tmp / "authz.yaml").write_text("checks: {}\n")
        doc["extauthz"] = {
            "port": 18040,
            "config": "authz.yaml",
            "protocol": "http",
            "http_port": 18043,
            "workers": 1,
        }
    path = tmp / "mesh.yaml"
    path.write_text(yaml.safe_dump(doc))
    return load_mesh(path)


def route(name: str, prefix: str, filters: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "name": name,
        "match": {"path": {"prefix": prefix}},
        "to": {"service": "s"},
        "filters": filters,
    }


def hop(m: Any, name: str) -> dict[str, Any]:
    (entry,) = explain(m, name)
    (found,) = [s for s in entry["services"] if s["service"] == "extproc"]
    return found  # type: ignore[no-any-return]


def test_request_header_chains_go_over_http_the_others_stay_on_grpc(tmp_path: Path) -> None:
    m = mesh(
        tmp_path,
        [
            route("a", "/a", COHORT),
            route("b", "/b", HEADERS),
            route("c", "/c", STATEFUL),
            route("d", "/d", RESPONSE),
            route("e", "/e", BODY),
        ],
    )
    assert [hop(m, n)["protocol"] for n in "abcde"] == ["http", "http", "grpc", "http", "grpc"]
    assert "not over HTTP: filter request_id may carry the request's state" in hop(m, "c")["reason"]
    assert "not over HTTP: filter body_redact may carry" in hop(m, "e")["reason"]
    block = m.extproc
    filters = ExtProcSide.http_filters(block, "legation|extproc", m)
    names = [f.name for f in filters]
    assert names == [
        "envoy.filters.http.ext_proc",
        "legation.ext_proc.http.a",
        "legation.ext_proc.http.b",
        "legation.ext_proc.http.d",
    ]
    assert all(f.disabled for f in filters[1:])  # each enabled only by its route
    assert chain_path("a") in str(filters[1].typed_config.value)
    (_grpc, http) = ExtProcSide.clusters(block, "legation|extproc")
    assert http.name == EXTPROC_HTTP_CLUSTER
    ports = [
        e.endpoint.address.socket_address.port_value
        for e in http.load_assignment.endpoints[0].lb_endpoints
    ]
    assert ports == [18042, 18142]  # one endpoint per worker


def test_a_route_enables_only_its_own_filter(tmp_path: Path) -> None:
    from envoy.config.route.v3 import route_components_pb2 as rc
    from envoy.extensions.filters.http.ext_proc.v3 import ext_proc_pb2

    from legation.services import route_chains

    m = mesh(tmp_path, [route("a", "/a", COHORT), route("c", "/c", STATEFUL)])
    chains = route_chains(m)
    out_a, out_c = rc.Route(), rc.Route()
    _services.apply_services(m, out_a, m.routes[0], chains)
    _services.apply_services(m, out_c, m.routes[1], chains)
    assert set(out_a.typed_per_filter_config) == {
        "envoy.filters.http.ext_proc",
        "legation.ext_proc.http.a",
    }
    grpc_side = ext_proc_pb2.ExtProcPerRoute()
    out_a.typed_per_filter_config["envoy.filters.http.ext_proc"].Unpack(grpc_side)
    assert grpc_side.disabled  # the route's chain runs over HTTP only
    assert set(out_c.typed_per_filter_config) == {"envoy.filters.http.ext_proc"}


def test_a_route_fused_into_the_authz_call_stays_fused(tmp_path: Path) -> None:
    m = mesh(tmp_path, [route("a", "/a", COHORT), route("b", "/b", HEADERS)], authz_http=True)
    fused = hop(m, "a")
    assert fused["protocol"] == "http" and "fused" in fused["reason"]
    assert fused["filter"].startswith("legation.fused")
    own = hop(m, "b")  # headers is not fused (only header_route is): its own HTTP filter
    assert own["filter"] == "legation.ext_proc.http.b"
    assert "not fused: filter headers needs ext_proc's stream" in own["reason"]
