"""Live swap through the real control plane: an edit to ``authz.yaml`` or the rate-limit YAML
alone (``mesh.yaml`` untouched) is validated and swapped into the running service, without a
restart; an invalid edit keeps the running config, is reported with file and field, and counted.
The services are called over gRPC on loopback, as Envoy calls them."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2 as common_rl
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc

from legation.controlplane import ControlPlane
from tests.conftest import free_port

POLICY = """\
package demo.authz

import rego.v1

default allow := false

allow if input.attributes.request.http.headers["x-role"] == "admin"
"""

AUTHZ = """\
checks:
  rego: {{type: rego, options: {{policy_dir: policies, reload_interval_s: 0}}}}
default_checks: [rego]
deny_status: {deny}
"""

LIMITS = """\
domain: test
descriptors:
  - key: generic_key
    value: web
    {limit}
"""

MESH = """\
xds: {{port: {xds}}}
services: [{{name: web, port: 9080, endpoints: [{{port: {app}}}]}}]
extauthz: {{port: {authz}, config: authz.yaml}}
ratelimit: {{port: {rl}, config: limits.yaml, domain: test}}
routes:
  - name: web
    mesh_hosts: [web]
    to: {{service: web}}
    authz: demo.authz
    rate_limits: [{{actions: [{{generic_key: {{value: web}}}}]}}]
"""


@pytest.fixture
async def plane(tmp_path: Path) -> AsyncIterator[ControlPlane]:
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "authz.rego").write_text(POLICY)
    (tmp_path / "authz.yaml").write_text(AUTHZ.format(deny=403))
    (tmp_path / "limits.yaml").write_text(
        LIMITS.format(limit="rate_limit: {unit: minute, requests_per_unit: 1}")
    )
    mesh = tmp_path / "mesh.yaml"
    mesh.write_text(
        MESH.format(xds=free_port(), app=free_port(), authz=free_port(), rl=free_port())
    )
    cp = ControlPlane(
        mesh, status_port=0, ca_dir=tmp_path / "ca", on_event=lambda _: None, poll_interval=3600
    )
    await cp.start()
    try:
        yield cp
    finally:
        await cp.stop()


def _address(cp: ControlPlane, kind: str) -> str:
    return str(cp.services.status()[kind]["address"])


async def _check(cp: ControlPlane, role: str) -> external_auth_pb2.CheckResponse:
    request = external_auth_pb2.CheckRequest()
    http = request.attributes.request.http
    http.method, http.path = "GET", "/"
    http.headers["x-role"] = role
    request.attributes.context_extensions["policy"] = "demo.authz"
    async with grpc.aio.insecure_channel(_address(cp, "extauthz")) as channel:
        stub = external_auth_pb2_grpc.AuthorizationStub(channel)
        return await stub.Check(request, timeout=10)  # type: ignore[no-any-return]


async def _limit(cp: ControlPlane) -> int:
    request = rls_pb2.RateLimitRequest(
        domain="test",
        descriptors=[
            common_rl.RateLimitDescriptor(
                entries=[common_rl.RateLimitDescriptor.Entry(key="generic_key", value="web")]
            )
        ],
    )
    async with grpc.aio.insecure_channel(_address(cp, "ratelimit")) as channel:
        stub = rls_pb2_grpc.RateLimitServiceStub(channel)
        answer = await stub.ShouldRateLimit(request, timeout=10)
        return int(answer.overall_code)


def _rejected(cp: ControlPlane) -> float:
    value = cp.registry.get_sample_value("legation_config_reloads_total", {"result": "rejected"})
    return value or 0.0


async def test_authz_yaml_edit_is_swapped_live(plane: ControlPlane) -> None:
    folder = plane.mesh_path.parent
    server = plane.services.running["extauthz"].server  # type: ignore[attr-defined]
    assert (await _check(plane, "viewer")).denied_response.status.code == 403
    assert (await _check(plane, "admin")).status.code == 0
    generation = plane.generation

    (folder / "authz.yaml").write_text(AUTHZ.format(deny=418))
    assert await plane.reload() is True
    assert (await _check(plane, "viewer")).denied_response.status.code == 418
    assert (await _check(plane, "admin")).status.code == 0
    assert plane.services.running["extauthz"].server is server  # swapped, not restarted
    assert plane.generation == generation  # the proxies' config did not change
    assert await plane.reload() is False  # nothing changed since


async def test_invalid_authz_yaml_edit_keeps_the_running_config(plane: ControlPlane) -> None:
    folder = plane.mesh_path.parent
    (folder / "authz.yaml").write_text(AUTHZ.format(deny=99))
    assert await plane.reload() is False
    assert plane.last_error is not None
    assert plane.last_error.startswith(
        f"{plane.mesh_path}: extauthz.config: {folder / 'authz.yaml'}: deny_status: "
    )
    assert _rejected(plane) == 1
    assert await plane.reload() is False  # reported once
    assert _rejected(plane) == 1
    assert (await _check(plane, "viewer")).denied_response.status.code == 403  # still running
    (folder / "authz.yaml").write_text(AUTHZ.format(deny=451))
    assert await plane.reload() is True
    assert (await _check(plane, "viewer")).denied_response.status.code == 451


async def test_ratelimit_yaml_edit_is_swapped_live(plane: ControlPlane) -> None:
    folder = plane.mesh_path.parent
    over, ok = rls_pb2.RateLimitResponse.OVER_LIMIT, rls_pb2.RateLimitResponse.OK
    server = plane.services.running["ratelimit"].server  # type: ignore[attr-defined]
    assert [await _limit(plane), await _limit(plane)] == [ok, over]

    (folder / "limits.yaml").write_text(LIMITS.format(limit="rate_limit: {unlimited: true}"))
    assert await plane.reload() is True
    assert [await _limit(plane), await _limit(plane)] == [ok, ok]
    assert plane.services.running["ratelimit"].server is server

    (folder / "limits.yaml").write_text(
        LIMITS.format(limit="rate_limit: {unit: fortnight, requests_per_unit: 1}")
    )
    assert await plane.reload() is False
    assert plane.last_error is not None
    assert plane.last_error.startswith(
        f"{plane.mesh_path}: ratelimit.config: {folder / 'limits.yaml'}: descriptors[0]"
    )
    assert _rejected(plane) == 1
    assert [await _limit(plane), await _limit(plane)] == [ok, ok]  # the last good config


async def test_a_policy_package_removed_from_the_directory_is_reported(plane: ControlPlane) -> None:
    folder = plane.mesh_path.parent
    (folder / "policies" / "authz.rego").write_text(POLICY.replace("demo.authz", "demo.other"))
    assert await plane.reload() is False
    assert (
        plane.last_error is not None
        and "routes[0].authz: no policy package 'demo.authz'" in plane.last_error
    )
    assert "it declares: demo.other" in plane.last_error


async def test_the_watcher_picks_up_a_service_file_edit(plane: ControlPlane) -> None:
    import asyncio

    plane.poll_interval = 0.02
    assert plane._watcher is not None
    plane._watcher.cancel()
    plane._watcher = asyncio.create_task(plane._watch())
    (plane.mesh_path.parent / "authz.yaml").write_text(AUTHZ.format(deny=418))
    for _ in range(500):
        if (await _check(plane, "viewer")).denied_response.status.code == 418:
            break
        await asyncio.sleep(0.02)
    assert (await _check(plane, "viewer")).denied_response.status.code == 418
