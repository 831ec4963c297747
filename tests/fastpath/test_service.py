"""The ext_authz service kind with ``protocol: http``: the HTTP call-out starts beside the gRPC
server, in the control plane (embedded) and in a ``legation serve extauthz --plan`` process (a
:class:`Follower`), answers with the same checks, and follows a live swap of ``authz.yaml``
(edited alone) exactly as the gRPC server does."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from legation.controlplane import ControlPlane
from legation.services.embedded import EmbeddedServices
from legation.services.follower import Follower
from legation.services.published import plan_path
from tests.conftest import free_port
from tests.services import test_live_swap as live

MESH = live.MESH.replace(
    "extauthz: {{port: {authz}, config: authz.yaml}}",
    "extauthz: {{port: {authz}, config: authz.yaml, protocol: http, http_port: {http},"
    " http_headers: {{request: [x-role]}}}}",
)


class _Via:
    """What live._check needs: the services' addresses."""

    def __init__(self, services: EmbeddedServices) -> None:
        self.services = services


async def http_status(port: int, role: str, *, policy: str = "demo.authz") -> int:
    """The status of one call as Envoy's ext_authz (HTTP mode) makes it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(
            f"GET /legation/check/ HTTP/1.1\r\nhost: web\r\nx-role: {role}\r\n"
            f"x-legation-policy: {policy}\r\ncontent-length: 0\r\n\r\n".encode()
        )
        head = await reader.readuntil(b"\r\n\r\n")
        return int(head.split(b" ", 2)[1])
    finally:
        writer.close()


async def _setup(tmp_path: Path, **cp_options: object) -> ControlPlane:
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "authz.rego").write_text(live.POLICY)
    (tmp_path / "authz.yaml").write_text(live.AUTHZ.format(deny=403))
    (tmp_path / "limits.yaml").write_text(
        live.LIMITS.format(limit="rate_limit: {unit: minute, requests_per_unit: 1}")
    )
    mesh = tmp_path / "mesh.yaml"
    mesh.write_text(
        MESH.format(
            xds=free_port(), app=free_port(), authz=free_port(), http=free_port(), rl=free_port()
        )
    )
    cp = ControlPlane(
        mesh,
        status_port=0,
        ca_dir=tmp_path / "ca",
        on_event=lambda _: None,
        poll_interval=3600,
        **cp_options,
    )  # type: ignore[arg-type]
    await cp.start()
    return cp


@pytest.fixture
async def plane(tmp_path: Path) -> AsyncIterator[ControlPlane]:
    cp = await _setup(tmp_path)
    try:
        yield cp
    finally:
        await cp.stop()


async def _same_answers_and_swap(
    cp: ControlPlane, services: EmbeddedServices, follow: object = None
) -> None:
    service = services.running["extauthz"]
    port = service.status()["http_port"]  # type: ignore[attr-defined]
    via = _Via(services)
    assert await http_status(port, "viewer") == 403
    assert await http_status(port, "admin") == 200
    assert (await live._check(via, "viewer")).denied_response.status.code == 403  # type: ignore
    http, grpc = service.http, service.server  # type: ignore[attr-defined]

    (cp.mesh_path.parent / "authz.yaml").write_text(live.AUTHZ.format(deny=418))
    assert await cp.reload() is True
    if follow is not None:
        assert await follow() is True  # type: ignore[operator]
    assert await http_status(port, "viewer") == 418  # the swapped config, over HTTP too
    assert (await live._check(via, "viewer")).denied_response.status.code == 418  # type: ignore
    assert await http_status(port, "admin") == 200
    assert (service.http, service.server) == (http, grpc)  # type: ignore[attr-defined]


async def test_embedded_serves_http_beside_grpc_and_follows_swaps(plane: ControlPlane) -> None:
    await _same_answers_and_swap(plane, plane.services)


async def test_serve_plan_process_serves_http_beside_grpc(tmp_path: Path) -> None:
    cp = await _setup(tmp_path, services_dir=tmp_path / "services")
    follower = Follower(plan_path(tmp_path / "services", "extauthz"), kind="extauthz")
    try:
        await follower.start()
        await _same_answers_and_swap(cp, follower.services, follower.check)
    finally:
        await follower.stop()
        await cp.stop()


async def test_stop_closes_the_http_port(plane: ControlPlane) -> None:
    port = plane.services.running["extauthz"].status()["http_port"]
    await plane.stop()
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)
