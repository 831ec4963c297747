"""The control plane's certificates: issued on start, kept across reloads, rotated by its timer
(a settable clock makes them due; the real timer task notices), a bad CA rejected like a bad mesh.
No Envoy here: the published snapshots are read from the cache."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml

from legation.certs import WORKLOAD_CERT
from legation.controlplane import ControlPlane
from legation.xds.types import ResourceType
from tests.config.meshdata import base
from tests.conftest import distinct_ports


class Clock:
    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now


def write(path: Path, **mtls: object) -> None:
    data = base()
    endpoints = data["services"][0]["endpoints"]
    # no two alike: a port drawn twice makes the mesh invalid (free_port alone may repeat one)
    ports = iter(distinct_ports(*(str(i) for i in range(3 + 3 * len(endpoints)))).values())
    data["xds"] = {"port": next(ports)}
    for i, ep in enumerate(endpoints):
        ep["sidecar"] = {
            "inbound_port": next(ports),
            "outbound_port": next(ports),
            "admin_port": next(ports),
        }
        ep["port"] = 9111 + i
    data["gateway"] = {"port": next(ports), "admin_port": next(ports)}
    if mtls:
        data["mtls"] = mtls
    path.write_text(yaml.safe_dump(data))


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def cp(tmp_path: Path, clock: Clock) -> AsyncIterator[ControlPlane]:
    mesh = tmp_path / "mesh.yaml"
    write(mesh, mode="strict", cert_ttl="1h", ca_dir="ca")
    plane = ControlPlane(
        mesh,
        status_port=0,
        poll_interval=3600,
        on_event=lambda line: None,
        clock=clock,
        rotation_check=0.02,
    )
    await plane.start()
    yield plane
    await plane.stop()


async def test_issued_on_start_and_shown_in_status(cp: ControlPlane, tmp_path: Path) -> None:
    assert (tmp_path / "ca" / "ca.key").is_file()
    status = cp.status()
    assert status["mtls"]["mode"] == "strict"
    assert status["mtls"]["ca"]["fingerprint_sha256"] == cp.issuer.ca.fingerprint  # type: ignore[union-attr]
    certs = {p["node_id"]: p["certificate"] for p in status["proxies"]}
    assert certs["gateway-ingress"]["spiffe_id"] == "spiffe://cluster.local/ns/default/sa/ingress"
    assert certs["sidecar-reviews-0"]["serial"] == cp.issuer.certs["sidecar-reviews-0"].serial_hex
    assert all(WORKLOAD_CERT in s.resources(ResourceType.SECRET) for s in cp.snapshots.values())


async def test_timer_rotates_due_certificates_and_republishes(
    cp: ControlPlane, clock: Clock
) -> None:
    before = {n: c.serial for n, c in cp.issuer.certs.items()}
    snaps = dict(cp.snapshots)
    generation = cp.generation
    clock.now += timedelta(minutes=41)  # past 2/3 of an hour
    deadline = time.monotonic() + 5
    while any(cp.issuer.certs[n].serial == s for n, s in before.items()):
        assert time.monotonic() < deadline, "the rotation timer did not re-issue"
        await asyncio.sleep(0.02)
    assert cp.generation == generation  # same mesh, new certificates
    while any(cp.cache.snapshot(n) is not cp.snapshots[n] for n in snaps):  # debounced
        assert time.monotonic() < deadline, "the new snapshots were not published"
        await asyncio.sleep(0.02)
    for node, old in snaps.items():
        new = cp.snapshots[node]
        changed = {t for t in ResourceType if old.version(t) != new.version(t)}
        assert changed == {ResourceType.SECRET}
    assert cp.issuer.next_renewal() == clock.now.replace(microsecond=0) + timedelta(minutes=40)


async def test_reload_keeps_certificates_and_a_bad_ca_is_rejected(
    cp: ControlPlane, tmp_path: Path
) -> None:
    before = {n: c.serial for n, c in cp.issuer.certs.items()}
    text = cp.mesh_path.read_text().replace("9111", "9113")  # an endpoint moves
    cp.mesh_path.write_text(text)
    assert await cp.reload()
    assert {n: c.serial for n, c in cp.issuer.certs.items()} == before
    (tmp_path / "bad.crt").write_text("not a certificate")
    (tmp_path / "bad.key").write_text("not a key")
    data = yaml.safe_load(text)
    data["mtls"] = {"mode": "strict", "ca_cert": "bad.crt", "ca_key": "bad.key"}
    cp.mesh_path.write_text(yaml.safe_dump(data))
    generation = cp.generation
    assert not await cp.reload()
    assert cp.last_error == f"{tmp_path / 'bad.crt'}: not a PEM certificate"
    assert cp.generation == generation
    assert {n: c.serial for n, c in cp.issuer.certs.items()} == before


async def test_turning_mtls_off_drops_the_secrets(cp: ControlPlane) -> None:
    data = yaml.safe_load(cp.mesh_path.read_text())
    del data["mtls"]
    cp.mesh_path.write_text(yaml.safe_dump(data))
    assert await cp.reload()
    assert cp.status()["mtls"] is None
    assert all(not s.resources(ResourceType.SECRET) for s in cp.snapshots.values())
    assert "certificate" not in cp.status()["proxies"][0]


async def test_xds_is_tls_with_enrolled_proxies_even_with_mtls_off(tmp_path: Path) -> None:
    import grpc
    from envoy.config.core.v3 import base_pb2
    from envoy.service.discovery.v3 import discovery_pb2

    from legation.certs.xds_auth import files_credentials

    mesh = tmp_path / "mesh.yaml"
    write(mesh)  # no mtls block: mode off
    plane = ControlPlane(
        mesh, status_port=0, poll_interval=3600, on_event=lambda line: None, ca_dir=tmp_path / "ca"
    )
    await plane.start()
    try:
        assert plane.server is not None and plane.issuer.certs == {}
        assert (tmp_path / "ca" / "xds" / "ca.key").is_file()  # the xDS channel's own root
        assert not (tmp_path / "ca" / "ca.key").exists()  # no mesh CA without mTLS
        _, files = plane.enrol("gateway-ingress")
        assert files.directory == tmp_path / "nodes" / "gateway-ingress"
        method = "/envoy.service.cluster.v3.ClusterDiscoveryService/FetchClusters"
        ask = discovery_pb2.DiscoveryRequest(node=base_pb2.Node(id="gateway-ingress"))
        async with grpc.aio.insecure_channel(plane.server.address) as channel:
            with pytest.raises(grpc.aio.AioRpcError):
                await channel.unary_unary(method)(ask.SerializeToString(), timeout=5)
        async with grpc.aio.secure_channel(
            plane.server.address, files_credentials(files)
        ) as channel:
            got = await channel.unary_unary(method)(ask.SerializeToString(), timeout=5)
            assert discovery_pb2.DiscoveryResponse.FromString(got).resources
    finally:
        await plane.stop()


async def test_status_endpoint_answers_400_to_a_non_utf8_request_line(cp: ControlPlane) -> None:
    for line in (b"GET /\xff\xfe HTTP/1.1", b"\xc3\x28 / HTTP/1.1", b"GARBAGE", b"GET status"):
        reader, writer = await asyncio.open_connection("127.0.0.1", cp.status_port)
        writer.write(line + b"\r\nhost: x\r\n\r\n")
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        # the endpoint's HTTP library answers a request it cannot parse in HTTP/1.0
        assert answer.split(b"\r\n", 1)[0] in (
            b"HTTP/1.1 400 Bad Request",
            b"HTTP/1.0 400 Bad Request",
        ), (line, answer)
    reader, writer = await asyncio.open_connection("127.0.0.1", cp.status_port)
    writer.write(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")  # HTTP/1.1 needs a Host
    assert (await asyncio.wait_for(reader.read(), 5)).startswith(b"HTTP/1.1 200 OK")
    writer.close()
