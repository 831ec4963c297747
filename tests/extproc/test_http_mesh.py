"""``extproc: {protocol: http}`` through the control plane and a real gateway Envoy, strict mTLS.

Headers-only chains (``header_route``; ``headers`` with a stateless response hook) go over
Envoy's ext_proc HTTP transport, a chain whose response hook reads the request's state
(``request_id``) stays on the gRPC stream, and ``legation explain`` says which and why;
the HTTP transport is mutual TLS, the mesh's proxies only.
"""

from __future__ import annotations

import ssl
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from legation.demo import DemoApp
from legation.explain import explain
from legation.extproc.http_server import chain_path
from tests.conftest import distinct_ports
from tests.envoy_stack import MeshWorld
from tests.extproc import harness

pytestmark = [pytest.mark.integration, pytest.mark.slow]

COHORT = [
    {
        "name": "header_route",
        "options": {
            "header": "x-legation-cohort",
            "default": "stable",
            "rules": [{"header": "x-beta", "present": True, "value": "canary"}],
        },
    }
]


def write_mesh(folder: Path, stable: int, canary: int, stamp: dict[str, Any] | None = None) -> Path:
    ports = distinct_ports("xds", "gw", "admin", "proc", "http")
    stamp = stamp or {"response": {"set": {"x-stamp": "yes"}}}
    mesh: dict[str, Any] = {
        "xds": {"port": ports["xds"]},
        "mtls": {"mode": "strict", "ca_dir": "ca"},
        "gateway": {"name": "gw", "port": ports["gw"], "admin_port": ports["admin"]},
        "extproc": {
            "port": ports["proc"],
            "protocol": "http",
            "http_port": ports["http"],
            "workers": 1,
            "timeout": "1s",
        },
        "services": [
            {"name": "stable", "port": 9080, "endpoints": [{"port": stable}]},
            {"name": "canary", "port": 9081, "endpoints": [{"port": canary}]},
        ],
        "routes": [
            {
                "name": "app-canary",
                "match": {
                    "path": {"prefix": "/app"},
                    "headers": [{"name": "x-legation-cohort", "exact": "canary"}],
                },
                "to": {"service": "canary"},
                "filters": COHORT,
            },
            {
                "name": "app",
                "match": {"path": {"prefix": "/app"}},
                "to": {"service": "stable"},
                "filters": COHORT,
            },
            {
                "name": "stamped",
                "match": {"path": {"prefix": "/stamped"}},
                "to": {"service": "stable"},
                "filters": [{"name": "headers", "options": stamp}],
            },
            {
                "name": "rid",
                "match": {"path": {"prefix": "/rid"}},
                "to": {"service": "stable"},
                "filters": [{"name": "request_id"}],
            },
            {"name": "plain", "match": {"path": {"prefix": "/plain"}}, "to": {"service": "stable"}},
        ],
    }
    folder.mkdir(exist_ok=True)
    path = folder / "mesh.yaml"
    path.write_text(yaml.safe_dump(mesh))
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MeshWorld]:
    tmp = tmp_path_factory.mktemp("extproc-http-mesh")
    stable = DemoApp(name="stable").start_in_thread()
    canary = DemoApp(name="canary").start_in_thread()
    world = MeshWorld(tmp / "w", write_mesh(tmp / "w", stable.port, canary.port))
    try:
        world.start()
        yield world
    finally:
        world.close()
        for app in (stable, canary):
            app.stop_thread()


def get(world: MeshWorld, path: str, **headers: str) -> harness.Response:
    assert world.cp.mesh is not None and world.cp.mesh.gateway is not None
    return harness.request(world.cp.mesh.gateway.port, path, headers=headers)


def test_explain_names_the_transport_and_why(world: MeshWorld) -> None:
    mesh = world.cp.mesh
    assert mesh is not None

    def hop(route: str) -> dict[str, Any]:
        (entry,) = explain(mesh, route)
        (found,) = [s for s in entry["services"] if s["service"] == "extproc"]
        return found  # type: ignore[no-any-return]

    app = hop("app")
    assert app["protocol"] == "http"
    assert "HTTP transport" in app["reason"] and "work-in-progress" in app["reason"]
    assert hop("stamped")["protocol"] == "http"  # a stateless response hook
    rid = hop("rid")
    assert rid["protocol"] == "grpc"
    assert "not over HTTP: filter request_id may carry the request's state" in rid["reason"]


def test_header_routing_over_the_http_transport(world: MeshWorld) -> None:
    assert get(world, "/app/x").json()["service"] == "stable"
    assert get(world, "/app/x", **{"x-beta": "1"}).json()["service"] == "canary"
    # a client cannot pick the cohort itself: the canary route runs the chain too
    forged = get(world, "/app/x", **{"x-legation-cohort": "canary"}).json()
    assert forged["service"] == "stable"
    assert get(world, "/stamped/x").headers["x-stamp"] == "yes"  # a response phase over HTTP
    echoed = get(world, "/rid/x", **{"x-correlation-id": "abc-1"})  # the gRPC stream
    assert echoed.headers["x-correlation-id"] == "abc-1"
    assert get(world, "/plain/x").json()["service"] == "stable"


def test_the_gateway_calls_the_chain_over_http(world: MeshWorld) -> None:
    (envoy,) = world.envoys.values()
    dump = str(envoy.config_dump())
    assert "legation.ext_proc.http.app" in dump and chain_path("app") in dump
    assert "legation.ext_proc.http.stamped" in dump
    assert "legation.ext_proc.http.rid" not in dump  # its chain stays on gRPC

    def count(stat: str) -> int:
        return sum(v for k, v in envoy.stats("ext_proc").items() if k.endswith(stat))

    sent, failed = count("stream_msgs_sent"), count("http_not_ok_resp_received")
    for _ in range(3):
        assert get(world, "/app/x").status == 200
    assert count("stream_msgs_sent") == sent + 3
    assert count("http_not_ok_resp_received") == failed == 0


def test_the_http_transport_requires_the_mesh_client_certificate(world: MeshWorld) -> None:
    port = world.cp.services.running["extproc"].status()["http_port"]
    url = f"127.0.0.1:{port}{chain_path('app')}"
    with pytest.raises((urllib.error.URLError, ConnectionError)):  # plaintext: refused
        urllib.request.urlopen(f"http://{url}", data=b"{}", timeout=5)
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
        urllib.request.urlopen(f"https://{url}", data=b"{}", timeout=5, context=context)


def test_a_reload_moves_a_chain_between_the_transports(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """A chain that changes its phases moves from gRPC to HTTP and back: the listener gains and
    loses the chain's filter, the route follows, and every request on the way is served."""
    tmp = tmp_path_factory.mktemp("extproc-http-reload")
    app = DemoApp(name="stable").start_in_thread()
    other = DemoApp(name="canary").start_in_thread()
    mesh_path = write_mesh(tmp / "w", app.port, other.port)
    world = MeshWorld(tmp / "w", mesh_path)
    ports = yaml.safe_load(mesh_path.read_text())

    def rewrite(filters: list[dict[str, Any]]) -> None:
        doc = dict(ports)
        (route,) = [r for r in doc["routes"] if r["name"] == "stamped"]
        route["filters"] = filters
        mesh_path.write_text(yaml.safe_dump(doc))
        assert world.loop.run(world.cp.reload()) is True
        world.wait_in_sync()

    def transport() -> str:
        assert world.cp.mesh is not None
        (entry,) = explain(world.cp.mesh, "stamped")
        return str(next(s for s in entry["services"] if s["service"] == "extproc")["protocol"])

    try:
        world.start()
        (envoy,) = world.envoys.values()
        assert transport() == "http"
        assert get(world, "/stamped/x").headers["x-stamp"] == "yes"
        rewrite([{"name": "request_id", "options": {"header": "x-stamp"}}])
        assert transport() == "grpc"
        assert get(world, "/stamped/x", **{"x-stamp": "abc"}).headers["x-stamp"] == "abc"
        assert "legation.ext_proc.http.stamped" not in str(envoy.config_dump())
        rewrite([{"name": "headers", "options": {"response": {"set": {"x-stamp": "again"}}}}])
        assert transport() == "http"
        assert get(world, "/stamped/x").headers["x-stamp"] == "again"
        assert "legation.ext_proc.http.stamped" in str(envoy.config_dump())
        assert get(world, "/app/x", **{"x-beta": "1"}).json()["service"] == "canary"
    finally:
        world.close()
        app.stop_thread()
        other.stop_thread()
