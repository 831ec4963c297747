"""A translated mesh behaves as declared in the real Envoy (one gateway, demo apps on loopback).

The gateway's snapshot is inlined into a static bootstrap (legation.translate.static), which
proves the generated resources are valid for Envoy 1.40 and do what the mesh says, without the
xDS server (test_mesh_xds.py goes through it). One Envoy serves every test of this module.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pytest
import yaml

from legation.config import Mesh, parse_mesh
from legation.demo import DemoApp
from legation.envoy_process import EnvoyProcess
from legation.translate import translate
from legation.translate.static import static_bootstrap
from tests.conftest import free_port

pytestmark = pytest.mark.integration

N = 200  # requests per statistical check; all loops are bounded by count and by a deadline


@dataclass
class Reply:
    status: int
    body: dict[str, Any] | None
    headers: dict[str, str]


def get(port: int, path: str, headers: dict[str, str] | None = None) -> Reply:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            status, raw, hdrs = resp.status, resp.read(), dict(resp.headers)
    except urllib.error.HTTPError as err:
        status, raw, hdrs = err.code, err.read(), dict(err.headers)
    try:
        body = json.loads(raw) if raw else None
    except ValueError:
        body = None
    return Reply(status, body, {k.lower(): v for k, v in hdrs.items()})


def many(port: int, path: str, n: int, headers: dict[str, str] | None = None) -> list[Reply]:
    deadline = time.monotonic() + 60
    out = []
    for _ in range(n):
        if time.monotonic() > deadline:
            break
        out.append(get(port, path, headers))
    assert len(out) == n, "load loop hit its deadline"
    return out


@dataclass
class World:
    mesh: Mesh
    envoy: EnvoyProcess
    apps: dict[str, DemoApp]

    @property
    def port(self) -> int:
        assert self.mesh.gateway is not None
        return self.mesh.gateway.port


def mesh_yaml(apps: dict[str, DemoApp], gateway_port: int, admin_port: int) -> str:
    def ep(key: str) -> dict[str, Any]:
        return {"port": apps[key].port, "labels": {"version": apps[key].version}}

    data = {
        "gateway": {"port": gateway_port, "admin_port": admin_port},
        "xds": {"port": free_port()},
        "services": [
            {
                "name": "reviews",
                "port": 9080,
                "subsets": [
                    {"name": "v1", "labels": {"version": "v1"}},
                    {"name": "v2", "labels": {"version": "v2"}},
                    {"name": "flaky", "labels": {"version": "flaky"}},
                ],
                "endpoints": [ep("reviews-v1"), ep("reviews-v2"), ep("reviews-flaky")],
            },
            {"name": "ratings", "port": 9080, "endpoints": [ep("ratings")]},
            {"name": "shadow", "port": 9080, "endpoints": [ep("shadow")]},
            {
                "name": "fragile",
                "port": 9080,
                "circuit_breakers": {
                    "max_connections": 1,
                    "max_pending_requests": 1,
                    "max_requests": 1,
                },
                "endpoints": [ep("fragile")],
            },
        ],
        "routes": [
            {
                "name": "v2-by-header",
                "match": {
                    "path": {"prefix": "/reviews"},
                    "headers": [{"name": "x-version", "exact": "v2"}],
                },
                "to": {"service": "reviews", "subset": "v2"},
            },
            {
                "name": "reviews",
                "match": {"path": {"exact": "/reviews"}},
                "to": {"service": "reviews", "subset": "v1"},
            },
            {
                "name": "canary",
                "match": {"path": {"exact": "/canary"}},
                "split": [
                    {"service": "reviews", "subset": "v1", "weight": 80},
                    {"service": "reviews", "subset": "v2", "weight": 20},
                ],
            },
            {
                "name": "retried",
                "match": {"path": {"exact": "/flaky"}},
                "to": {"service": "reviews", "subset": "flaky"},
                "retries": {"attempts": 2, "retry_on": ["5xx"]},
            },
            {
                "name": "fault",
                "match": {"path": {"exact": "/fault"}},
                "to": {"service": "ratings"},
                "fault": {"abort": {"percent": 30, "status": 418}},
            },
            {
                "name": "slow",
                "match": {"path": {"exact": "/slow"}},
                "to": {"service": "ratings"},
                "timeout": "200ms",
            },
            {
                "name": "mirrored",
                "match": {"path": {"exact": "/mirrored"}},
                "to": {"service": "ratings"},
                "mirror": {"service": "shadow"},
            },
            {
                "name": "fragile",
                "match": {"path": {"exact": "/fragile"}},
                "to": {"service": "fragile"},
            },
        ],
    }
    return yaml.safe_dump(data, sort_keys=False)


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    specs = {
        "reviews-v1": ("reviews", "v1", 0),
        "reviews-v2": ("reviews", "v2", 0),
        "reviews-flaky": ("reviews", "flaky", 2),
        "ratings": ("ratings", "v1", 0),
        "shadow": ("shadow", "v1", 0),
        "fragile": ("fragile", "v1", 0),
    }
    apps: dict[str, DemoApp] = {}
    envoy: EnvoyProcess | None = None
    try:
        for key, (name, version, fail_every) in specs.items():
            apps[key] = DemoApp(name=name, version=version, fail_every=fail_every)
            apps[key].start_in_thread()
        admin = free_port()
        mesh = parse_mesh(mesh_yaml(apps, free_port(), admin), source="test-mesh.yaml")
        node = "gateway-ingress"
        snapshot = translate(mesh, version="t1")[node]
        config = static_bootstrap(snapshot, node_id=node, admin_port=admin)
        envoy = EnvoyProcess(config, admin_port=admin, name="mesh-gateway").start()
        envoy.wait_live()
        yield World(mesh, envoy, apps)
    finally:
        if envoy is not None:
            envoy.stop()
        for app in apps.values():
            app.stop_thread()


def test_header_routing_reaches_v2(world: World) -> None:
    with_header = get(world.port, "/reviews", {"x-version": "v2"})
    without = get(world.port, "/reviews")
    assert (with_header.status, without.status) == (200, 200)
    assert with_header.body is not None and without.body is not None
    assert (with_header.body["service"], with_header.body["version"]) == ("reviews", "v2")
    assert without.body["version"] == "v1"


def test_weighted_split_within_tolerance(world: World) -> None:
    replies = many(world.port, "/canary", N)
    versions = [r.body["version"] for r in replies if r.status == 200 and r.body]
    assert len(versions) == N
    v2 = versions.count("v2")
    # 20% of 200 = 40, binomial sd ~5.7: +-22 is about 4 sd, so a flake is ~1 in 10^4 runs
    assert 18 <= v2 <= 62, v2
    assert versions.count("v1") == N - v2


def test_retry_turns_the_flaky_503_into_200(world: World) -> None:
    flaky = world.apps["reviews-flaky"]
    before = flaky.requests
    replies = many(world.port, "/flaky", 20)
    assert [r.status for r in replies] == [200] * 20
    assert all(r.body and r.body["version"] == "flaky" for r in replies)
    # the app failed every second request, so Envoy must have retried about 20 times
    assert flaky.requests - before >= 39
    stats = world.envoy.stats(r"outbound\|reviews\|flaky\.upstream_rq_retry$")
    assert stats["cluster.outbound|reviews|flaky.upstream_rq_retry"] >= 19


def test_fault_abort_at_the_configured_percentage(world: World) -> None:
    ratings = world.apps["ratings"]
    before = ratings.requests
    replies = many(world.port, "/fault", N)
    aborted = sum(r.status == 418 for r in replies)
    passed = sum(r.status == 200 for r in replies)
    assert aborted + passed == N
    # 30% of 200 = 60, sd ~6.5: +-26 is 4 sd
    assert 34 <= aborted <= 86, aborted
    assert ratings.requests - before == passed  # aborted requests never reach the app


def test_timeout_gives_504(world: World) -> None:
    assert get(world.port, "/slow").status == 200
    slow = get(world.port, "/slow?delay_ms=1500")
    assert slow.status == 504


def test_tripped_circuit_breaker_gives_503(world: World) -> None:
    def call(_: int) -> Reply:
        return get(world.port, "/fragile?delay_ms=400")

    with ThreadPoolExecutor(max_workers=8) as pool:
        replies = list(pool.map(call, range(8)))
    statuses = sorted(r.status for r in replies)
    assert 200 in statuses and 503 in statuses, statuses
    overflowed = [r for r in replies if r.status == 503]
    assert all(r.headers.get("x-envoy-overloaded") == "true" for r in overflowed)
    stats = world.envoy.stats(r"outbound\|fragile\.upstream_rq_pending_overflow$")
    assert stats["cluster.outbound|fragile.upstream_rq_pending_overflow"] == len(overflowed)


def test_mirroring_copies_traffic_to_the_shadow(world: World) -> None:
    shadow, ratings = world.apps["shadow"], world.apps["ratings"]
    shadow_before, ratings_before = shadow.requests, ratings.requests
    replies = many(world.port, "/mirrored", 10)
    assert all(r.status == 200 and r.body and r.body["service"] == "ratings" for r in replies)
    deadline = time.monotonic() + 5  # mirrored requests are fire-and-forget: wait for them
    while shadow.requests - shadow_before < 10 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert shadow.requests - shadow_before == 10
    assert ratings.requests - ratings_before == 10
    assert shadow.paths[-1] == "/mirrored"
