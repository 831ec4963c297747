"""Fused decisions through real Envoys: one mesh whose route makes the three gRPC call-outs
(ext_authz with JWT + Rego, ext_proc ``header_route``, rate limit), the same mesh with
``extauthz.protocol: http``, where the route makes one HTTP call. The same table of requests runs
through both gateways; the client and the upstream must see the same answers.

Each world counts in its own memory store, and each sequence of requests runs in both, so the
counters agree. One difference is by design (module doc of :mod:`legation.translate._fused`):
none in this table.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from legation.demo import DemoApp
from legation.explain import explain
from tests.conftest import distinct_ports
from tests.envoy_stack import MeshWorld
from tests.extauthz.conftest import Client, Reply, Signer

pytestmark = [pytest.mark.integration, pytest.mark.slow]

POLICY = """package fused.test
import rego.v1

default allow := false
allow if input.attributes.request.http.headers["x-role"] == "admin"
"""

LIMITS = {
    "domain": "mesh",
    "descriptors": [
        {
            "key": "generic_key",
            "value": "api",
            "descriptors": [
                {"key": "user", "rate_limit": {"unit": "minute", "requests_per_unit": 3}}
            ],
        },
        {
            "key": "generic_key",
            "value": "open",
            "descriptors": [
                {"key": "remote_address", "rate_limit": {"unit": "minute", "requests_per_unit": 2}}
            ],
        },
    ],
}

COHORT = [
    {
        "name": "header_route",
        "options": {
            "header": "x-legation-cohort",
            "rules": [{"header": "x-user", "one_of": ["alice"], "value": "beta"}],
        },
    }
]
API_LIMITS = [
    {
        "actions": [
            {"generic_key": {"value": "api"}},
            {"request_headers": {"header": "x-user", "key": "user"}},
        ]
    }
]


def write_mesh(folder: Path, signer: Signer, upstreams: dict[str, int], *, http: bool) -> Path:
    folder.mkdir()
    (folder / "policies").mkdir()
    (folder / "policies" / "policy.rego").write_text(POLICY)
    (folder / "ratelimit.yaml").write_text(yaml.safe_dump(LIMITS))
    authz_config = {
        "checks": {
            "jwt": {
                "type": "jwt",
                "options": {
                    "providers": [
                        {
                            "name": "t",
                            "issuer": "https://issuer.test",
                            "audiences": "any",
                            "jwks": {"keys": [signer.jwk]},
                        }
                    ]
                },
            },
            "rego": {"type": "rego", "options": {"policy_dir": "policies"}},
        },
        "default_checks": ["jwt", "rego"],
        "deny_status": 403,
    }
    (folder / "authz.yaml").write_text(yaml.safe_dump(authz_config))
    ports = distinct_ports("xds", "gw", "admin", "authz", "http", "proc", "rl")
    # one worker: the fused routes' memory counters live in it (several need backend: redis)
    authz: dict[str, Any] = {"port": ports["authz"], "config": "authz.yaml", "workers": 1}
    if http:
        authz.update(protocol="http", http_port=ports["http"], http_headers={"request": ["x-role"]})
    checked = {"authz": "fused.test", "filters": COHORT, "rate_limits": API_LIMITS}
    mesh = {
        "xds": {"port": ports["xds"]},
        "mtls": {"mode": "off"},
        "gateway": {"name": "gw", "port": ports["gw"], "admin_port": ports["admin"]},
        "extauthz": authz,
        "extproc": {"port": ports["proc"]},
        "ratelimit": {
            "port": ports["rl"],
            "config": "ratelimit.yaml",
            "domain": "mesh",
            "failure_mode": "open",
        },
        "services": [
            {
                "name": "api",
                "port": 9080,
                "subsets": [
                    {"name": "v1", "labels": {"version": "v1"}},
                    {"name": "v2", "labels": {"version": "v2"}},
                ],
                "endpoints": [
                    {"port": upstreams["v1"], "labels": {"version": "v1"}},
                    {"port": upstreams["v2"], "labels": {"version": "v2"}},
                ],
            }
        ],
        "routes": [
            {
                "name": "api-beta",
                "to": {"service": "api", "subset": "v2"},
                "match": {
                    "path": {"prefix": "/api"},
                    "headers": [{"name": "x-legation-cohort", "exact": "beta"}],
                },
                **checked,
            },
            {
                "name": "api",
                "to": {"service": "api", "subset": "v1"},
                "match": {"path": {"prefix": "/api"}},
                **checked,
            },
            {
                "name": "open",
                "to": {"service": "api", "subset": "v1"},
                "match": {"path": {"prefix": "/open"}},
                "rate_limits": [
                    {"actions": [{"generic_key": {"value": "open"}}, {"remote_address": {}}]}
                ],
            },
        ],
    }
    path = folder / "mesh.yaml"
    path.write_text(yaml.safe_dump(mesh))
    return path


@pytest.fixture(scope="module")
def signer() -> Signer:
    return Signer("k1")


@pytest.fixture(scope="module")
def worlds(
    tmp_path_factory: pytest.TempPathFactory, signer: Signer
) -> Iterator[dict[str, MeshWorld]]:
    tmp = tmp_path_factory.mktemp("fused")
    apps = {v: DemoApp(name="api", version=v).start_in_thread() for v in ("v1", "v2")}
    started: dict[str, MeshWorld] = {}
    try:
        for name, http in (("chain", False), ("fused", True)):
            mesh = write_mesh(tmp / name, signer, {v: a.port for v, a in apps.items()}, http=http)
            started[name] = MeshWorld(tmp / name, mesh)
            started[name].start()
        yield started
    finally:
        for world in started.values():
            world.close()
        for app in apps.values():
            app.stop_thread()


def client(world: MeshWorld) -> Client:
    assert world.cp.mesh is not None and world.cp.mesh.gateway is not None
    return Client(world.cp.mesh.gateway.port)


def seen(reply: Reply) -> dict[str, Any]:
    """What a client and the upstream see, less what varies between two runs."""
    out: dict[str, Any] = {"status": reply.status}
    for name in ("x-ratelimit-limit", "x-ratelimit-remaining", "x-envoy-ratelimited"):
        out[name] = reply.headers.get(name)
    reset = reply.headers.get("x-ratelimit-reset")
    out["reset"] = reset is not None and 0 <= int(reset) <= 60
    if reply.status == 200:
        echo = json.loads(reply.body)
        out["version"] = echo["version"]
        out["upstream"] = {
            k: v for k, v in echo["headers"].items() if k.startswith("x-legation-") or k == "x-user"
        }
    else:
        out["body"] = reply.body
    return out


def test_explain_names_one_hop_fused_and_three_chained(worlds: dict[str, MeshWorld]) -> None:
    chain, fused = (explain(worlds[n].cp.mesh, "api")[0] for n in ("chain", "fused"))  # type: ignore[arg-type]
    assert (chain["hops"], chain["grpc"], chain["fused"]) == (3, 3, [])
    assert (fused["hops"], fused["http"], fused["fused"]) == (
        1,
        1,
        ["extauthz", "extproc", "ratelimit"],
    )
    (open_route,) = explain(worlds["fused"].cp.mesh, "open")  # type: ignore[arg-type]
    assert (open_route["hops"], open_route["fused"]) == (1, ["ratelimit"])


CLAIMS = {"iss": "https://issuer.test", "sub": "u", "exp": int(time.time()) + 3600}


def _table(signer: Signer) -> list[tuple[str, str, dict[str, str]]]:
    admin = {
        "authorization": f"Bearer {signer.token(CLAIMS)}",
        "x-role": "admin",
    }
    guest = {**admin, "x-role": "guest"}
    return [
        ("allow", "/api/a", {**admin, "x-user": "bob"}),
        ("deny by rego", "/api/a", {**guest, "x-user": "bob"}),
        ("deny by jwt: none", "/api/a", {"x-role": "admin", "x-user": "bob"}),
        (
            "deny by jwt: forged",
            "/api/a",
            {"authorization": "Bearer a.b.c", "x-role": "admin", "x-user": "bob"},
        ),
        ("header route to v2", "/api/a", {**admin, "x-user": "alice"}),
        (
            "spoofed cohort stays v1",
            "/api/a",
            {**admin, "x-user": "dave", "x-legation-cohort": "beta"},
        ),
        ("spoofed route header", "/api/a", {**admin, "x-user": "erin", "x-legation-route": "open"}),
        ("429 with headers 1", "/api/a", {**admin, "x-user": "carol"}),
        ("429 with headers 2", "/api/a", {**admin, "x-user": "carol"}),
        ("429 with headers 3", "/api/a", {**admin, "x-user": "carol"}),
        ("429 with headers 4", "/api/a", {**admin, "x-user": "carol"}),
        ("denied requests are not counted", "/api/a", {**guest, "x-user": "frank"}),
        ("long descriptor value", "/api/a", {**admin, "x-user": "u" * 30000}),
        ("remote address 1", "/open", {}),
        ("remote address 2", "/open", {"x-forwarded-for": "10.9.9.9"}),
        ("remote address 3: 429", "/open", {"x-legation-remote-address": "10.8.8.8"}),
    ]


def test_same_decisions_through_the_chain_and_the_fused_call(
    worlds: dict[str, MeshWorld], signer: Signer
) -> None:
    answers: dict[str, dict[str, Any]] = {}
    for name, path, headers in _table(signer):
        chain = seen(client(worlds["chain"]).get(path, headers=headers))
        fused = seen(client(worlds["fused"]).get(path, headers=headers))
        assert fused == chain, name
        answers[name] = fused
    # not vacuous: each case decided what its name says
    assert answers["allow"]["version"] == "v1" and answers["allow"]["x-ratelimit-remaining"] == "2"
    assert answers["deny by rego"]["status"] == 403
    assert answers["deny by jwt: none"]["status"] == 401
    assert answers["deny by jwt: forged"]["status"] == 401
    assert answers["header route to v2"]["version"] == "v2"
    assert answers["header route to v2"]["upstream"]["x-legation-cohort"] == "beta"
    assert answers["spoofed cohort stays v1"]["version"] == "v1"
    assert "x-legation-cohort" not in answers["spoofed cohort stays v1"]["upstream"]
    assert answers["spoofed route header"]["version"] == "v1"
    over = answers["429 with headers 4"]
    assert (over["status"], over["x-ratelimit-limit"], over["x-ratelimit-remaining"]) == (
        429,
        "3, 3;w=60",
        "0",
    )
    assert over["x-envoy-ratelimited"] == "true" and over["reset"]
    assert answers["long descriptor value"]["x-ratelimit-remaining"] == "2"
    # a client's own x-legation-remote-address changes nothing: the address Envoy trusts counts
    assert answers["remote address 3: 429"]["status"] == 429
    # a second frank is allowed: denied requests were not counted, on either path
    for world in worlds.values():
        assert (
            client(world).get("/api/a", headers={**_table(signer)[0][2], "x-user": "frank"}).status
            == 200
        )


@pytest.mark.parametrize(
    "header", [b"x-user: a\r\n b", b"x-user: a\nx-legation-cohort: beta", b"x-user: a\rb"]
)
def test_cr_lf_in_a_descriptor_header_smuggles_nothing(
    worlds: dict[str, MeshWorld], signer: Signer, header: bytes
) -> None:
    """CR/LF in a header Envoy reads for a descriptor and a routing rule: Envoy takes a folded
    line or a bare CR as one value and a bare LF as a line end (so the cohort header is the
    client's own, removed as any spoof is), before any call-out. Either way both paths answer
    alike: a new user counted once, routed to v1, no cohort upstream."""
    seen_by: list[tuple[bytes, bytes, Any]] = []
    for world in worlds.values():
        assert world.cp.mesh is not None and world.cp.mesh.gateway is not None
        with socket.create_connection(("127.0.0.1", world.cp.mesh.gateway.port), 5) as sock:
            token = signer.token(CLAIMS).encode()
            sock.sendall(
                b"GET /api/a HTTP/1.1\r\nhost: x\r\nconnection: close\r\nx-role: admin\r\n"
                b"authorization: Bearer " + token + b"\r\n" + header + b"\r\n\r\n"
            )
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.lower().split(b"\r\n")
        remaining = next(h for h in lines if h.startswith(b"x-ratelimit-remaining"))
        echo = json.loads(body)
        upstream = {k: v for k, v in echo["headers"].items() if k.startswith("x-legation-")}
        seen_by.append((lines[0], remaining, (echo["version"], upstream)))
    assert seen_by[0] == seen_by[1]
    assert seen_by[0] == (b"http/1.1 200 ok", b"x-ratelimit-remaining: 2", ("v1", {}))


def test_failure_modes_when_the_services_are_gone(
    worlds: dict[str, MeshWorld], signer: Signer
) -> None:
    """ext_authz fails closed (403 on /api), rate limiting open (/open passes): both paths."""
    for world in worlds.values():
        for service in list(world.cp.services.running.values()):
            world.loop.run(service.stop(0))
    admin = _table(signer)[0][2]
    for world in worlds.values():
        assert client(world).get("/api/a", headers=admin).status == 403
        assert client(world).get("/open", headers={"x-forwarded-for": "10.1.1.1"}).status == 200
