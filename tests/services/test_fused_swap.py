"""The ext_authz service's fused call-out follows live swaps like the rate-limit service: an
edited limits file and a new routing rule apply from the next call, with no restart, and a
route the mesh dropped is refused once the previous generation is gone."""

from __future__ import annotations

import asyncio
import http.client
from pathlib import Path
from typing import Any

import yaml

from legation.config import load_mesh
from legation.services.extauthz import AuthzService
from tests.conftest import distinct_ports


def write(tmp: Path, *, per_minute: int, users: list[str], route: str = "api") -> Path:
    (tmp / "authz.yaml").write_text("checks: {}\n")
    limits = {
        "domain": "mesh",
        "descriptors": [
            {
                "key": "user",
                "rate_limit": {"unit": "minute", "requests_per_unit": per_minute},
            }
        ],
    }
    (tmp / "rl.yaml").write_text(yaml.safe_dump(limits))
    ports = distinct_ports("authz", "http", "rl", "proc")
    mesh: dict[str, Any] = {
        "gateway": {"name": "gw", "port": 18090, "admin_port": 18091},
        "extauthz": {
            "port": ports["authz"],
            "config": "authz.yaml",
            "protocol": "http",
            "http_port": ports["http"],
            "workers": 1,
        },
        "extproc": {"port": ports["proc"], "workers": 1},
        "ratelimit": {"port": ports["rl"], "config": "rl.yaml", "domain": "mesh"},
        "services": [{"name": "s", "port": 80, "endpoints": [{"port": 9000}]}],
        "routes": [
            {
                "name": route,
                "to": {"service": "s"},
                "filters": [
                    {
                        "name": "header_route",
                        "options": {
                            "header": "x-legation-cohort",
                            "rules": [{"header": "x-user", "one_of": users, "value": "beta"}],
                        },
                    }
                ],
                "rate_limits": [
                    {"actions": [{"request_headers": {"header": "x-user", "key": "user"}}]}
                ],
            }
        ],
    }
    path = tmp / "mesh.yaml"
    if path.exists():  # keep the ports of the running service
        old = yaml.safe_load(path.read_text())
        for block in ("extauthz", "extproc", "ratelimit"):
            mesh[block] = old[block]
    path.write_text(yaml.safe_dump(mesh))
    return path


def ask(port: int, route: str, user: str) -> tuple[int, dict[str, str]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request(
            "GET", "/legation/check/x", headers={"x-legation-route": route, "x-user": user}
        )
        resp = conn.getresponse()
        resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}
    finally:
        conn.close()


async def test_limits_and_routing_are_swapped_live(tmp_path: Path) -> None:
    path = write(tmp_path, per_minute=1, users=["alice"])
    service = AuthzService(AuthzService.settings(load_mesh(path), tmp_path), tls=None)
    await service.start()
    try:
        port = service.status()["http_port"]
        first = await asyncio.to_thread(ask, port, "api", "bob")
        assert first[0] == 200 and first[1]["x-envoy-auth-headers-to-remove"] == "x-legation-cohort"
        assert (await asyncio.to_thread(ask, port, "api", "bob"))[0] == 429

        write(tmp_path, per_minute=5, users=["alice", "bob"])
        await service.apply(AuthzService.settings(load_mesh(path), tmp_path))
        status, headers = await asyncio.to_thread(ask, port, "api", "bob")
        assert (status, headers["x-legation-cohort"], headers["x-ratelimit-limit"]) == (
            200,
            "beta",
            "5, 5;w=60",
        )

        write(tmp_path, per_minute=5, users=["alice"], route="renamed")
        spec = AuthzService.settings(load_mesh(path), tmp_path)
        await service.apply(spec)
        assert (await asyncio.to_thread(ask, port, "renamed", "carol"))[0] == 200
        assert (await asyncio.to_thread(ask, port, "api", "carol"))[0] == 200  # previous one
        await service.apply(spec)  # one more generation: "api" is gone for good
        assert (await asyncio.to_thread(ask, port, "api", "carol"))[0] == 403
    finally:
        await service.stop(0)
