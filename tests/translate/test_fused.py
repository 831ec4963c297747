"""Which routes are fused into the one HTTP call-out, and why the others are not
(legation.translate._fused), read through ``legation explain`` as a user sees them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from legation.config import load_mesh
from legation.explain import explain
from legation.translate._fused import FusedRoute, fused_routes

COHORT = [
    {
        "name": "header_route",
        "options": {
            "header": "x-legation-cohort",
            "rules": [{"header": "x-user", "one_of": ["a"], "value": "beta"}],
        },
    }
]
LIMITS = [
    {
        "actions": [
            {"generic_key": {"value": "x"}},
            {"request_headers": {"header": "x-user", "key": "user"}},
        ]
    }
]


def mesh(
    tmp: Path, routes: list[dict[str, Any]], *, backend: str = "memory", workers: int = 1
) -> Any:
    (tmp / "authz.yaml").write_text("checks: {}\n")
    (tmp / "rl.yaml").write_text("domain: mesh\ndescriptors: []\n")
    rl: dict[str, Any] = {"port": 18032, "config": "rl.yaml", "domain": "mesh", "backend": backend}
    if backend == "redis":
        rl["redis_url"] = "redis://127.0.0.1:6379/0"
    doc = {
        "extauthz": {
            "port": 18030,
            "config": "authz.yaml",
            "protocol": "http",
            "http_port": 18033,
            "workers": workers,
        },
        "extproc": {"port": 18031},
        "ratelimit": rl,
        "gateway": {"name": "gw", "port": 18034, "admin_port": 18035},
        "services": [{"name": "s", "port": 80, "endpoints": [{"port": 9000}]}],
        "routes": routes,
    }
    path = tmp / "mesh.yaml"
    path.write_text(yaml.safe_dump(doc))
    return load_mesh(path)


def route(name: str, prefix: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "match": {"path": {"prefix": prefix}}, "to": {"service": "s"}, **extra}


def test_a_route_with_authz_routing_and_limits_is_one_hop(tmp_path: Path) -> None:
    m = mesh(tmp_path, [route("api", "/api", authz="p.q", filters=COHORT, rate_limits=LIMITS)])
    (entry,) = explain(m, "api")
    assert (entry["hops"], entry["http"], entry["grpc"]) == (1, 1, 0)
    assert entry["fused"] == ["extauthz", "extproc", "ratelimit"]
    found = fused_routes(m)["api"]
    assert isinstance(found, FusedRoute) and found.authz == "p.q" and not found.fail_open


def test_what_does_not_fit_stays_on_grpc_and_says_why(tmp_path: Path) -> None:
    claim = [{"actions": [{"jwt_claim": {"claim": "sub"}}]}]
    body = [{"name": "body_redact", "options": {"fields": ["a"]}}]
    spoofable = [{"actions": [{"request_headers": {"header": "x-legation-user", "key": "u"}}]}]
    m = mesh(
        tmp_path,
        [
            route("claim", "/c", authz="p.q", rate_limits=claim),
            route("body", "/b", filters=body),
            route("pinned", "/p", authz="p.q", authz_protocol="grpc", filters=COHORT),
            route("spoof", "/s", rate_limits=spoofable),
        ],
        backend="redis",
    )
    by = {e["route"]: e for e in explain(m)}
    assert by["claim"]["hops"] == 2 and "jwt_claim sub" in by["claim"]["services"][2]["reason"]
    assert (
        by["body"]["grpc"] == 1 and "needs ext_proc's stream" in by["body"]["services"][1]["reason"]
    )
    assert by["pinned"]["grpc"] == 2
    assert "authz_protocol: grpc" in by["pinned"]["services"][1]["reason"]
    assert "x-legation-user" in by["spoof"]["services"][2]["reason"]


def test_memory_backend_fuses_limits_only_when_every_limited_route_is(tmp_path: Path) -> None:
    claim = [{"actions": [{"jwt_claim": {"claim": "sub"}}]}]
    routes = [
        route("a", "/a", rate_limits=LIMITS),
        route("b", "/b", authz="p.q", rate_limits=claim),
    ]
    memory = fused_routes(mesh(tmp_path, routes))
    assert isinstance(memory["a"], str) and "one process" in memory["a"]
    (tmp_path / "r").mkdir()
    redis = fused_routes(mesh(tmp_path / "r", routes, backend="redis"))
    assert isinstance(redis["a"], FusedRoute)


def test_a_routing_group_is_fused_whole_or_not_at_all(tmp_path: Path) -> None:
    beta = {
        "match": {
            "path": {"prefix": "/api"},
            "headers": [{"name": "x-legation-cohort", "exact": "beta"}],
        }
    }
    other = [{"actions": [{"generic_key": {"value": "y"}}]}]
    same = fused_routes(
        mesh(
            tmp_path,
            [
                {**route("beta", "/api", filters=COHORT, rate_limits=LIMITS), **beta},
                route("api", "/api", filters=COHORT, rate_limits=LIMITS),
                route("elsewhere", "/other", rate_limits=other),
            ],
        )
    )
    assert all(isinstance(same[n], FusedRoute) for n in ("beta", "api", "elsewhere"))
    (tmp_path / "d").mkdir()
    differ = fused_routes(
        mesh(
            tmp_path / "d",
            [
                {**route("beta", "/api", filters=COHORT, rate_limits=other), **beta},
                route("api", "/api", filters=COHORT, rate_limits=LIMITS),
            ],
            backend="redis",
        )
    )
    assert isinstance(differ["api"], str) and "other rate_limits" in differ["api"]


def test_routing_never_moves_a_fused_request_to_a_route_with_another_policy(
    tmp_path: Path,
) -> None:
    """Envoy does not run the authz of a route it re-picked: a routing group whose routes ask
    for different policies is not fused (a request could reach the stricter route unchecked)."""
    beta = {
        "match": {
            "path": {"prefix": "/api"},
            "headers": [{"name": "x-legation-cohort", "exact": "beta"}],
        }
    }
    found = fused_routes(
        mesh(
            tmp_path,
            [
                {**route("beta", "/api", authz="strict.policy", filters=COHORT), **beta},
                route("api", "/api", filters=COHORT),
            ],
        )
    )
    assert isinstance(found["api"], str) and "another authz" in found["api"]


def test_memory_counters_in_several_call_out_workers_are_never_fused(tmp_path: Path) -> None:
    routes = [route("a", "/a", rate_limits=LIMITS)]
    split = fused_routes(mesh(tmp_path, routes, workers=2))
    assert isinstance(split["a"], str) and "2 workers" in split["a"]
    (tmp_path / "r").mkdir()
    assert isinstance(
        fused_routes(mesh(tmp_path / "r", routes, backend="redis", workers=2))["a"], FusedRoute
    )


def test_a_routing_group_shares_one_fail_mode(tmp_path: Path) -> None:
    """A route with only rate limits fails open (ratelimit open) and one that also routes fails
    closed (extproc closed); in one routing group both must be on the same fused filter, or a
    request re-routed to the other route would be counted again by the other filter."""
    beta = route("beta", "/api", rate_limits=LIMITS)
    beta["match"]["headers"] = [{"name": "x-legation-cohort", "exact": "beta"}]
    api = route("api", "/api", filters=COHORT, rate_limits=LIMITS)
    found = fused_routes(mesh(tmp_path, [beta, api]))
    fused = [found["beta"], found["api"]]
    assert all(isinstance(f, FusedRoute) for f in fused), found
    assert [f.fail_open for f in fused] == [False, False]  # type: ignore[union-attr]


def test_a_fused_filter_sends_the_client_address_only_when_a_route_reads_it(
    tmp_path: Path,
) -> None:
    from envoy.extensions.filters.http.ext_authz.v3 import ext_authz_pb2

    from legation.translate import translate
    from legation.translate._authz import FUSED_FILTERS
    from legation.xds.types import ResourceType
    from tests.translate.test_mesh import hcm_of, message

    by_address = [{"actions": [{"generic_key": {"value": "x"}}, {"remote_address": {}}]}]
    for limits, sent in ((LIMITS, False), (by_address, True)):
        folder = tmp_path / str(sent)
        folder.mkdir()
        route = {"name": "r", "to": {"service": "s"}, "authz": "p", "rate_limits": limits}
        loaded = mesh(folder, [route])
        assert isinstance(fused_routes(loaded)["r"], FusedRoute)
        out = translate(loaded, version="v1")["gateway-gw"]
        gateway = hcm_of(message(out, ResourceType.LISTENER, "gateway"))
        config = ext_authz_pb2.ExtAuthz()
        fused = next(f for f in gateway.http_filters if f.name == FUSED_FILTERS[False])
        fused.typed_config.Unpack(config)
        names = [h.key for h in config.http_service.authorization_request.headers_to_add]
        assert ("x-legation-remote-address" in names) is sent
        assert names[:3] == ["x-legation-policy", "x-legation-checks", "x-legation-route"]
