"""The services as processes of their own (what `legation up` runs): the control plane publishes
each accepted generation to ``services_dir`` and a :class:`Follower` (the body of ``legation serve
<kind> --plan``) serves it and follows it live; a rejected change publishes nothing. Run here on
one loop over loopback gRPC; tests/integration/test_up.py and the fault suite run real processes.
"""

from __future__ import annotations

import asyncio
import os
import stat
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import yaml

from legation.controlplane import ControlPlane
from legation.services.follower import Follower
from legation.services.published import FileTls, plan_path, read_plan
from tests.conftest import free_port
from tests.services import test_live_swap as live

pytestmark = pytest.mark.either_loop  # on asyncio's loop and on uvloop, as served

BAD_REGO = "package demo.authz\n\nallow := { 1\n"


async def _started(mesh: Path, tmp_path: Path) -> ControlPlane:
    """A started control plane on ``mesh`` publishing to ``tmp_path/services`` (its CA in
    ``tmp_path/ca``), no status port, no polling: the tests reload it themselves."""
    cp = ControlPlane(
        mesh,
        status_port=0,
        ca_dir=tmp_path / "ca",
        on_event=lambda _: None,
        poll_interval=3600,
        services_dir=tmp_path / "services",
    )
    await cp.start()
    return cp


@pytest.fixture
async def published(tmp_path: Path) -> AsyncIterator[tuple[ControlPlane, Follower]]:
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "authz.rego").write_text(live.POLICY)
    (tmp_path / "authz.yaml").write_text(live.AUTHZ.format(deny=403))
    (tmp_path / "limits.yaml").write_text(
        live.LIMITS.format(limit="rate_limit: {unit: minute, requests_per_unit: 1}")
    )
    mesh = tmp_path / "mesh.yaml"
    mesh.write_text(
        live.MESH.format(xds=free_port(), app=free_port(), authz=free_port(), rl=free_port())
    )
    cp = await _started(mesh, tmp_path)
    follower = Follower(plan_path(tmp_path / "services", "extauthz"), kind="extauthz")
    await follower.start()
    try:
        yield cp, follower
    finally:
        await follower.stop()
        await cp.stop()


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return str(resp.read().decode())


class _Via:
    """What live._check needs of a control plane: the service's address, from the follower."""

    def __init__(self, follower: Follower) -> None:
        self.services = follower.services


async def test_the_published_plan_is_served_and_followed_live(
    published: tuple[ControlPlane, Follower],
) -> None:
    cp, follower = published
    via = _Via(follower)
    assert cp.services.status()["extauthz"]["process"] == "own"
    assert not cp.services.registries()  # nothing runs in the control plane
    assert (await live._check(via, "viewer")).denied_response.status.code == 403  # type: ignore
    server = follower.services.running["extauthz"].server  # type: ignore[attr-defined]

    (cp.mesh_path.parent / "authz.yaml").write_text(live.AUTHZ.format(deny=418))
    assert await cp.reload() is True
    assert await follower.check() is True
    assert (await live._check(via, "viewer")).denied_response.status.code == 418  # type: ignore
    assert follower.services.running["extauthz"].server is server  # swapped, not restarted

    # the process's metrics, on the control plane's /metrics too
    follower.serve_metrics()
    text = await asyncio.to_thread(_get, f"http://127.0.0.1:{cp.status_port}/metrics")
    assert "legation_config_reloads_total" in text  # the control plane's own
    assert "legation_extauthz_decisions_total{" in text  # the extauthz process's
    assert await follower.check() is False  # nothing new

    (cp.mesh_path.parent / "authz.yaml").write_text(live.AUTHZ.format(deny=99))
    assert await cp.reload() is False  # rejected: nothing published
    assert await follower.check() is False
    assert (await live._check(via, "viewer")).denied_response.status.code == 418  # type: ignore


async def test_a_rego_syntax_error_is_a_rejected_change(
    published: tuple[ControlPlane, Follower],
) -> None:
    cp, _ = published
    plan = plan_path(cp.mesh_path.parent / "services", "extauthz").read_bytes()
    (cp.mesh_path.parent / "policies" / "authz.rego").write_text(BAD_REGO)
    assert await cp.reload() is False
    assert cp.last_error is not None and "authz.rego:" in cp.last_error
    assert "rego_parse_error" in cp.last_error
    assert live._rejected(cp) == 1  # type: ignore[arg-type]
    assert cp.status()["last_error"] == cp.last_error
    assert plan_path(cp.mesh_path.parent / "services", "extauthz").read_bytes() == plan


async def test_a_plan_for_a_gone_service_is_removed(
    published: tuple[ControlPlane, Follower],
) -> None:
    cp, _ = published
    doc = yaml.safe_load(cp.mesh_path.read_text())
    del doc["ratelimit"]
    for route in doc["routes"]:
        route.pop("rate_limits", None)
    cp.mesh_path.write_text(yaml.safe_dump(doc))
    assert await cp.reload() is True
    services = cp.mesh_path.parent / "services"
    assert not (services / "ratelimit").exists()
    assert read_plan(plan_path(services, "extauthz")).mesh_text == cp.mesh_path.read_text()


async def test_mtls_certificates_are_private_files_that_follow_renewals(tmp_path: Path) -> None:
    (tmp_path / "limits.yaml").write_text("domain: test\ndescriptors: []\n")
    mesh = tmp_path / "mesh.yaml"
    mesh.write_text(
        f"xds: {{port: {free_port()}}}\nmtls: {{mode: strict}}\n"
        f"services: [{{name: web, port: 9080, endpoints: [{{port: {free_port()}}}]}}]"
        f"\nratelimit: {{port: {free_port()}, config: limits.yaml, domain: test}}\n"
    )
    cp = await _started(mesh, tmp_path)
    try:
        folder = tmp_path / "services" / "ratelimit"
        assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700
        assert {stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()} == {0o600}
        source = FileTls(folder)
        first = source()
        assert first is not None and source() is first  # unchanged files: the same object
        assert first.cert_chain_pem == cp.issuer.service_certs["ratelimit"].cert_pem
        cp.rotate(force=True)
        assert cp.services._write_tls("ratelimit") is None  # type: ignore[union-attr]
        renewed = source()
        assert renewed is not None and renewed is not first
        assert renewed.cert_chain_pem == cp.issuer.service_certs["ratelimit"].cert_pem

        follower = Follower(folder / "plan.json", kind="ratelimit")
        port = await follower.start()  # serves mTLS from the files
        assert port > 0 and follower.current is not None and follower.current.tls
        await follower.stop()
    finally:
        await cp.stop()


async def test_only_the_rate_limiter_is_handed_the_redis_password(tmp_path: Path) -> None:
    (tmp_path / "limits.yaml").write_text("domain: test\ndescriptors: []\n")
    mesh = tmp_path / "mesh.yaml"
    mesh.write_text(
        f"xds: {{port: {free_port()}}}\n"
        f"services: [{{name: web, port: 9080, endpoints: [{{port: {free_port()}}}]}}]\n"
        f"extproc: {{port: {free_port()}}}\n"
        f"ratelimit: {{port: {free_port()}, config: limits.yaml, domain: test, backend: redis,"
        f" redis_url: 'redis://:s3cret-pw@127.0.0.1:6390/0'}}\n"
    )
    cp = await _started(mesh, tmp_path)
    try:
        services = tmp_path / "services"
        assert "s3cret-pw" in read_plan(plan_path(services, "ratelimit")).mesh_text
        other = read_plan(plan_path(services, "extproc")).mesh_text
        assert "s3cret-pw" not in other and "redis://:redacted@127.0.0.1:6390/0" in other
        follower = Follower(plan_path(services, "extproc"), kind="extproc")
        assert await follower.start() > 0  # the redacted mesh still plans the service
        await follower.stop()
    finally:
        await cp.stop()


async def test_every_worker_follows_the_plan(tmp_path: Path) -> None:
    """Two workers of one service (worker i on port + 100 i) follow the same plan file: a live
    change reaches both, and the control plane's /metrics shows each worker's own decisions."""
    from legation.errors import LegationError
    from tests.conftest import worker_base_port

    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "authz.rego").write_text(live.POLICY)
    (tmp_path / "authz.yaml").write_text(live.AUTHZ.format(deny=403))
    (tmp_path / "limits.yaml").write_text(
        live.LIMITS.format(limit="rate_limit: {unit: minute, requests_per_unit: 1}")
    )
    base = worker_base_port(2)
    mesh = tmp_path / "mesh.yaml"
    mesh.write_text(
        live.MESH.format(xds=free_port(), app=free_port(), authz=base, rl=free_port()).replace(
            "config: authz.yaml}", "config: authz.yaml, workers: 2}"
        )
    )
    cp = await _started(mesh, tmp_path)
    plan = plan_path(tmp_path / "services", "extauthz")
    workers = [Follower(plan, kind="extauthz", worker=i) for i in range(2)]
    try:
        assert cp.services.status()["extauthz"]["workers"] == 2
        assert [await w.start() for w in workers] == [base, base + 100]
        with pytest.raises(LegationError, match="worker 2 of a service with 2"):
            await Follower(plan, kind="extauthz", worker=2).start()
        for w in workers:
            w.serve_metrics()
            assert (await live._check(_Via(w), "viewer")).denied_response.status.code == 403  # type: ignore

        (tmp_path / "authz.yaml").write_text(live.AUTHZ.format(deny=418))
        assert await cp.reload() is True
        for w in workers:
            assert await w.check() is True
            assert (await live._check(_Via(w), "viewer")).denied_response.status.code == 418  # type: ignore

        text = await asyncio.to_thread(_get, f"http://127.0.0.1:{cp.status_port}/metrics")
        decided = [
            line
            for line in text.splitlines()
            if line.startswith("legation_extauthz_decisions_total{") and 'result="deny"' in line
        ]
        assert {line.split('worker="')[1][0] for line in decided} == {"0", "1"}, decided
    finally:
        for w in workers:
            await w.stop()
        await cp.stop()
