"""The schema pass: valid meshes load into the model; types, defaults and derived specs."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from pydantic import ValidationError

from legation.config import DemoSpec, ListenerSpec, Mesh, MeshConfigError, ProxySpec, load_mesh
from tests.config.meshdata import base, parse

QUICKSTART = Path(__file__).parents[2] / "examples" / "quickstart" / "mesh.yaml"


def test_small_mesh_loads_with_defaults() -> None:
    mesh = parse(base())
    assert (mesh.xds.host, mesh.xds.port) == ("127.0.0.1", 18000)
    reviews = mesh.service("reviews")
    assert reviews is not None
    assert reviews.protocol == "http"
    assert reviews.load_balancer.policy == "round_robin"
    assert reviews.connect_timeout == timedelta(seconds=1)
    assert [e.port for e in reviews.members("v2")] == [9112]
    assert mesh.routes[0].on_gateway is True


def test_mesh_is_frozen() -> None:
    mesh = parse(base())
    with pytest.raises(ValidationError):
        mesh.xds = mesh.xds  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "expected"),
    [("250ms", 0.25), ("2s", 2.0), ("1.5s", 1.5), ("1m", 60.0), (3, 3.0), (0.5, 0.5)],
)
def test_durations(text: object, expected: float) -> None:
    data = base()
    data["routes"][0]["timeout"] = text
    assert parse(data).routes[0].timeout == timedelta(seconds=expected)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("2x", "invalid duration '2x': use e.g. 250ms, 2s or 1m"),
        (0, "a duration must be positive"),
        (True, "expected a duration such as 250ms, 2s or 1m"),
    ],
)
def test_bad_duration(value: object, message: str) -> None:
    data = base()
    data["routes"][0]["timeout"] = value
    with pytest.raises(MeshConfigError) as info:
        parse(data)
    assert str(info.value) == f"mesh.yaml: routes[0].timeout: {message}"


def test_proxies_one_sidecar_per_instance_with_sidecar_then_gateway() -> None:
    proxies = parse(base()).proxies()
    assert proxies == [
        ProxySpec(
            node_id="sidecar-reviews-0",
            node_cluster="reviews",
            kind="sidecar",
            admin_port=19011,
            listeners=[
                ListenerSpec("inbound", "127.0.0.1", 15111),
                ListenerSpec("outbound", "127.0.0.1", 15211),
            ],
            service="reviews",
            instance="reviews-0",
        ),
        ProxySpec(
            node_id="sidecar-reviews-1",
            node_cluster="reviews",
            kind="sidecar",
            admin_port=19012,
            listeners=[
                ListenerSpec("inbound", "127.0.0.1", 15112),
                ListenerSpec("outbound", "127.0.0.1", 15212),
            ],
            service="reviews",
            instance="reviews-1",
        ),
        ProxySpec(
            node_id="gateway-ingress",
            node_cluster="ingress",
            kind="gateway",
            admin_port=19000,
            listeners=[ListenerSpec("gateway", "127.0.0.1", 8080)],
        ),
    ]


def test_demo_apps_take_version_from_labels_unless_given() -> None:
    data = base()
    eps = data["services"][0]["endpoints"]
    eps[0]["demo"] = {}
    eps[1]["demo"] = {"version": "canary", "fail_every": 3, "delay_ms": 20}
    assert parse(data).demo_apps() == [
        DemoSpec("reviews", "v1", "127.0.0.1", 9111, 0, 0, 15211, "reviews-0"),
        DemoSpec("reviews", "canary", "127.0.0.1", 9112, 3, 20, 15212, "reviews-1"),
    ]


def test_quickstart_loads_and_shows_what_the_issue_asks() -> None:
    mesh = load_mesh(QUICKSTART)
    assert isinstance(mesh, Mesh)
    kinds = [p.kind for p in mesh.proxies()]
    assert kinds.count("gateway") == 1
    assert kinds.count("sidecar") == sum(len(s.endpoints) for s in mesh.services)
    assert mesh.gateway is not None and mesh.gateway.port == 8080
    assert len(mesh.demo_apps()) == sum(len(s.endpoints) for s in mesh.services)
    by_name = {r.name: r for r in mesh.routes}
    header = by_name["reviews-v2-by-header"]
    assert header.match.headers[0].exact == "v2" and header.to is not None
    assert header.to.subset == "v2"
    canary = by_name["reviews-canary"]
    assert sorted(d.weight for d in canary.split or []) == [10, 90]
    assert by_name["reviews-flaky-retried"].retries is not None
    assert any(d.fail_every for d in mesh.demo_apps())
    fault = by_name["ratings-fault"].fault
    assert fault is not None and fault.abort is not None and fault.abort.status == 503


def test_placeholders_are_accepted_and_typed() -> None:
    data = base()
    data["extauthz"] = {"port": 18010, "config": "authz.yaml"}
    data["extproc"] = {"port": 18011, "failure_mode": "open"}
    data["ratelimit"] = {"port": 18012, "domain": "edge", "embedded": False}
    data["routes"][0].update(
        authz="reviews-policy",
        filters=[{"name": "request_id", "options": {"header": "x-id"}}],
        rate_limits=[
            {
                "actions": [
                    {"generic_key": {"value": "reviews"}},
                    {"request_headers": {"header": "x-user", "key": "user"}},
                    {"remote_address": {}},
                ]
            }
        ],
    )
    mesh = parse(data)
    assert mesh.extauthz is not None and mesh.extauthz.failure_mode == "closed"
    assert mesh.ratelimit is not None and mesh.ratelimit.failure_mode == "open"
    assert mesh.ratelimit.domain == "edge"
    assert mesh.extauthz.embedded and mesh.extauthz.config == "authz.yaml"
    assert not mesh.ratelimit.embedded and mesh.ratelimit.backend == "memory"
    assert mesh.extproc is not None and mesh.extproc.timeout.total_seconds() == 0.2
    route = mesh.routes[0]
    assert route.authz == "reviews-policy"
    assert route.filters[0].options == {"header": "x-id"}
    actions = route.rate_limits[0].actions
    assert actions[1].request_headers is not None and actions[1].request_headers.key == "user"
    assert actions[2].remote_address is not None
