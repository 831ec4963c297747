"""One rate-limit domain counted by both paths at once, through a real Envoy and a real Redis:
a fused route (decided by the ext_authz service's HTTP call-out, two workers) and a route that
stays on the gRPC rate-limit service (its ``request_id`` filter needs ext_proc) share one
descriptor, and the limit holds across both, whichever path and worker counts a request."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from legation.demo import DemoApp
from legation.explain import explain
from tests.conftest import distinct_ports
from tests.envoy_stack import MeshWorld
from tests.extauthz.conftest import Client
from tests.ratelimit.conftest import REDIS_SERVER, RedisServer

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server not installed"),
]

SHARED = [
    {
        "actions": [
            {"generic_key": {"value": "shared"}},
            {"request_headers": {"header": "x-user", "key": "user"}},
        ]
    }
]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MeshWorld]:
    tmp = tmp_path_factory.mktemp("fused-redis")
    redis = RedisServer(tmp)
    app = DemoApp(name="api").start_in_thread()
    limits = {
        "domain": "mesh",
        "descriptors": [
            {
                "key": "generic_key",
                "value": "shared",
                "descriptors": [
                    {"key": "user", "rate_limit": {"unit": "minute", "requests_per_unit": 4}}
                ],
            }
        ],
    }
    (tmp / "ratelimit.yaml").write_text(yaml.safe_dump(limits))
    (tmp / "authz.yaml").write_text("checks: {}\n")
    ports = distinct_ports("xds", "gw", "admin", "authz", "http", "proc", "rl")
    mesh: dict[str, Any] = {
        "xds": {"port": ports["xds"]},
        "mtls": {"mode": "off"},
        "gateway": {"name": "gw", "port": ports["gw"], "admin_port": ports["admin"]},
        "extauthz": {
            "port": ports["authz"],
            "config": "authz.yaml",
            "protocol": "http",
            "http_port": ports["http"],
            "workers": 2,
        },
        "extproc": {"port": ports["proc"], "workers": 1},
        "ratelimit": {
            "port": ports["rl"],
            "config": "ratelimit.yaml",
            "domain": "mesh",
            "backend": "redis",
            "redis_url": redis.url,
            "workers": 1,
        },
        "services": [{"name": "api", "port": 9080, "endpoints": [{"port": app.port}]}],
        "routes": [
            {
                "name": "fast",
                "match": {"path": {"prefix": "/fast"}},
                "to": {"service": "api"},
                "rate_limits": SHARED,
            },
            {
                "name": "slow",
                "match": {"path": {"prefix": "/slow"}},
                "to": {"service": "api"},
                "rate_limits": SHARED,
                "filters": [{"name": "request_id"}],
            },
        ],
    }
    path = tmp / "mesh.yaml"
    path.write_text(yaml.safe_dump(mesh))
    w = MeshWorld(tmp, path)
    try:
        w.start()
        yield w
    finally:
        w.close()
        app.stop_thread()
        redis.stop()


def test_both_paths_count_in_the_one_store(world: MeshWorld) -> None:
    assert world.cp.mesh is not None and world.cp.mesh.gateway is not None
    by = {e["route"]: e for e in explain(world.cp.mesh)}
    assert by["fast"]["fused"] == ["ratelimit"] and by["fast"]["http"] == 1
    assert by["slow"]["grpc"] == 2  # ext_proc and the rate-limit service
    client = Client(world.cp.mesh.gateway.port)
    seen = []
    for path in ("/fast", "/slow", "/fast", "/slow", "/fast", "/slow"):
        reply = client.get(path, headers={"x-user": "u1"})
        seen.append((reply.status, reply.headers.get("x-ratelimit-remaining")))
    # one counter for both routes: 4 a minute, then 429 on either path
    assert seen == [
        (200, "3"),
        (200, "2"),
        (200, "1"),
        (200, "0"),
        (429, "0"),
        (429, "0"),
    ]
