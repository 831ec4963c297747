"""The decision table through real Envoys configured by the control plane: one mesh with
``extauthz.protocol: http`` (the gateway's route calls the HTTP call-out), the same mesh with the
default gRPC call-out; the client and the upstream see the same answers. ``legation explain``
names the protocol each one uses. The HTTP mesh also runs with strict mTLS and the call-out on a
Unix socket (``http_socket``): the gateway calls it over mutual TLS on that socket, as it calls
gRPC services.

One difference is by design and asserted: a check that fails (raises, times out, builds a bad
header) is the service's ``error_status`` (503 here) on gRPC; in HTTP mode Envoy reads any 5xx
answer as a failed call and answers the filter's ``status_on_error`` (403, as for an unreachable
service on either path) without a body. Both deny."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from legation import plugins
from legation.demo import DemoApp
from legation.explain import explain
from tests.conftest import distinct_ports
from tests.envoy_stack import MeshWorld
from tests.extauthz.conftest import Client
from tests.fastpath.cases import (
    ALLOWED_HEADERS,
    CLIENT_HEADERS,
    UPSTREAM_HEADERS,
    TableFactory,
    service_config,
)
from tests.fastpath.conftest import policy_dir
from tests.fastpath.test_envoy import CASES, seen, set_cookies

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# (name, extauthz.protocol, mtls.mode): with strict mTLS the gateway calls both call-outs over
# mutual TLS (its workload certificate; the service's SPIFFE id checked); that world's HTTP
# call-out listens on a Unix socket (http_socket), the other's on a port
WORLDS = [("grpc", None, "off"), ("http", "http", "off"), ("http-mtls", "http", "strict")]
MESH_CASES = [*CASES, ("/inject", {}), ("/method", {})]


def write_mesh(folder: Path, upstream: int, *, protocol: str | None, mtls: str = "off") -> Path:
    folder.mkdir()
    config = service_config(policy_dir(folder))
    config["default_checks"] = ["table", "rego"]  # table: /boom raises, /slow times out
    (folder / "authz.yaml").write_text(yaml.safe_dump(config))
    ports = distinct_ports("xds", "gw", "admin", "authz", "http")
    authz: dict[str, Any] = {"port": ports["authz"], "config": "authz.yaml"}
    if protocol is not None:
        where = (
            {"http_socket": str(folder.resolve() / "authz.sock")}
            if mtls == "strict"
            else {"http_port": ports["http"]}
        )
        authz.update(
            protocol=protocol,
            **where,
            http_headers={
                "request": list(ALLOWED_HEADERS),
                "upstream": list(UPSTREAM_HEADERS),
                "client": list(CLIENT_HEADERS),
            },
        )
    mesh = {
        "xds": {"port": ports["xds"]},
        "mtls": {"mode": mtls, "ca_dir": "ca"},
        "gateway": {"name": "gw", "port": ports["gw"], "admin_port": ports["admin"]},
        "extauthz": authz,
        "services": [{"name": "upstream", "port": 9080, "endpoints": [{"port": upstream}]}],
        "routes": [{"name": "checked", "to": {"service": "upstream"}, "authz": "fast.test"}],
    }
    path = folder / "mesh.yaml"
    path.write_text(yaml.safe_dump(mesh))
    return path


@pytest.fixture(scope="module")
def worlds(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, MeshWorld]]:
    tmp = tmp_path_factory.mktemp("fastpath-mesh")
    plugins.register("extauthz.check", TableFactory())
    upstream = DemoApp(name="upstream").start_in_thread()
    started: dict[str, MeshWorld] = {}
    try:
        for name, protocol, mtls in WORLDS:
            mesh = write_mesh(tmp / name, upstream.port, protocol=protocol, mtls=mtls)
            world = MeshWorld(tmp / name, mesh)
            started[name] = world
            world.start()
        yield started
    finally:
        for world in started.values():
            world.close()
        upstream.stop_thread()
        plugins.unregister("extauthz.check", "table")


def client(world: MeshWorld) -> Client:
    assert world.cp.mesh is not None and world.cp.mesh.gateway is not None
    return Client(world.cp.mesh.gateway.port)


def test_each_mesh_uses_the_protocol_explain_names(worlds: dict[str, MeshWorld]) -> None:
    for name, world in worlds.items():
        assert world.cp.mesh is not None
        (entry,) = explain(world.cp.mesh, "checked")
        assert [(s["service"], s["protocol"]) for s in entry["services"]] == [
            ("extauthz", name.split("-")[0])
        ]
    assert "http_port" in worlds["http"].cp.services.running["extauthz"].status()
    world = worlds["http-mtls"]
    sock = str(world.mesh_path.parent.resolve() / "authz.sock")
    assert world.cp.services.running["extauthz"].status() == {"http_socket": sock}
    gateway = list(world.envoys.values())[-1]  # sidecars first, then the gateway
    before = gateway.stats(r"cluster\.legation\|extauthz-http\.upstream_rq_total")
    assert client(world).get("/allow", headers={"x-tenant": "t1"}).status == 200
    after = gateway.stats(r"cluster\.legation\|extauthz-http\.upstream_rq_total")
    assert sum(after.values()) == sum(before.values()) + 1
    assert f'"path": "{sock}"' in json.dumps(gateway.config_dump(), indent=1)


@pytest.mark.parametrize(("path", "headers"), MESH_CASES, ids=[f"{p} {h}" for p, h in MESH_CASES])
def test_same_answers_over_http_and_grpc(
    worlds: dict[str, MeshWorld], path: str, headers: dict[str, str]
) -> None:
    grpc = seen(client(worlds["grpc"]).get(path, headers=headers))
    for name in ("http", "http-mtls"):
        http = seen(client(worlds[name]).get(path, headers=headers))
        if grpc["status"] >= 500:  # a failed check: both deny (see the module docstring)
            assert grpc["status"] == 503
            assert http == {"status": 403, "body": b"", "content-type": None}, name
        else:
            assert http == grpc, name


def test_the_cases_are_not_vacuous(worlds: dict[str, MeshWorld]) -> None:
    http = client(worlds["http"])
    allow = seen(http.get("/allow", headers={"x-tenant": "t1", "x-user": "forged"}))
    assert allow["upstream"] == {"x-user": "t1", "x-tenant": "t1"}
    assert seen(http.get("/remove", headers={"x-drop": "1"}))["upstream"] == {
        "x-legation-user": "bob"
    }
    assert seen(http.get("/cache"))["x-cache"] == "hit"
    teapot = seen(http.get("/teapot"))
    assert (teapot["status"], teapot["body"]) == (409, b"no tea")
    assert (
        set_cookies(http, "/teapot")
        == set_cookies(client(worlds["grpc"]), "/teapot")
        == ["a=1", "b=2"]
    )
    assert seen(http.get("/limited"))["status"] == 429
    # a client's own x-legation-policy does not reach the call-out
    assert http.get("/teapot", headers={"x-legation-policy": "fast.dry"}).status == 409


def test_the_http_callout_requires_the_mesh_client_certificate(
    worlds: dict[str, MeshWorld],
) -> None:
    import socket
    import ssl

    path = worlds["http-mtls"].cp.services.running["extauthz"].status()["http_socket"]
    request = b"GET /legation/check/allow HTTP/1.1\r\nhost: a\r\ncontent-length: 0\r\n\r\n"

    def answer(wrap: ssl.SSLContext | None) -> bytes:
        """What the call-out answers one check sent plainly or over ``wrap`` (b"": nothing)."""
        raw = socket.socket(socket.AF_UNIX)
        raw.settimeout(5)
        conn = raw
        try:
            raw.connect(path)
            if wrap is not None:
                conn = wrap.wrap_socket(raw, server_hostname="x")
            conn.sendall(request)
            return conn.recv(4096)
        except OSError:  # ssl.SSLError too: the handshake or the read failed
            return b""
        finally:
            conn.close()
            raw.close()

    with socket.socket(socket.AF_UNIX) as live:  # the socket accepts (the gateway's calls
        live.connect(path)  # over it are test_each_mesh_uses_the_protocol_explain_names')
    assert not answer(None).startswith(b"HTTP/")  # plaintext: no answer
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    # TLS without a client certificate: no answer either
    assert not answer(context).startswith(b"HTTP/")
