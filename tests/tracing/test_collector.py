"""The embedded receiver follows the mesh (started, moved, capped, stopped, its mTLS turned on
and off), and the services' plans carry the tracing block to every process that runs a
service."""

from __future__ import annotations

import asyncio
import socket
from datetime import timedelta
from pathlib import Path

import grpc
import pytest

from legation.config import MeshConfigError
from legation.config.tracing import Tracing
from legation.controlplane import ControlPlane
from legation.grpc_server import BindError
from legation.services.embedded import EmbeddedServices
from legation.services.planning import Plan, plan
from legation.tracing import spans
from legation.tracing.receiver import EmbeddedCollector
from tests.config.meshdata import base, parse
from tests.conftest import distinct_ports
from tests.tracing.clients import export_one
from tests.tracing.test_store import span


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


async def test_follows_the_block_keeping_traces_across_a_port_move() -> None:
    ports = distinct_ports("a", "b")
    collector = EmbeddedCollector()
    try:
        await collector.follow(Tracing(port=ports["a"], max_traces=5))
        assert listening(ports["a"]) and collector.store is not None
        collector.store.add([span(1, 0)])
        await collector.follow(Tracing(port=ports["a"], max_traces=7, max_spans=9))
        assert (collector.store.max_traces, collector.store.max_spans) == (7, 9)
        await collector.follow(Tracing(port=ports["b"]))
        assert listening(ports["b"]) and not listening(ports["a"])
        assert collector.store.trace(f"{1:032x}") is not None  # kept across the move
        await collector.follow(Tracing(collector="127.0.0.1:9"))  # another collector
        assert collector.store is None and not listening(ports["b"])
    finally:
        await collector.stop()


async def test_a_taken_port_keeps_the_running_receiver() -> None:
    ports = distinct_ports("a", "b")
    collector = EmbeddedCollector()
    blocker = socket.create_server(("127.0.0.1", ports["b"]))
    try:
        await collector.follow(Tracing(port=ports["a"]))
        with pytest.raises(BindError, match=f"tracing: cannot listen on 127.0.0.1:{ports['b']}"):
            await collector.follow(Tracing(port=ports["b"]))
        assert collector.receiver is not None and collector.receiver.port == ports["a"]
        assert listening(ports["a"])
    finally:
        blocker.close()
        await collector.stop()


def test_the_plan_carries_the_tracing_block() -> None:
    data = base()
    data["tracing"] = {"collector": "127.0.0.1:4999", "sampling": 5}
    mesh = parse(data)
    planned = plan(mesh, mesh_path="mesh.yaml")
    assert planned.tracing == mesh.tracing
    assert plan(parse(base()), mesh_path="mesh.yaml").tracing is None


async def test_applying_a_plan_points_the_services_spans_at_its_collector() -> None:
    services = EmbeddedServices(on_event=lambda line: None)
    try:
        await services.apply(Plan(embedded={}, remote={}, tracing=Tracing(collector="10.0.0.1:1")))
        assert spans.CallTracer("x").on
        await services.apply(Plan(embedded={}, remote={}))
        assert not spans.CallTracer("x").on
    finally:
        spans.configure(None)
        await services.stop()


def test_the_receiver_cannot_take_the_status_port() -> None:
    data = base()
    data["tracing"] = {"port": 18001}
    with pytest.raises(MeshConfigError) as info:
        plan(parse(data), mesh_path="mesh.yaml", reserved={18001: "the status endpoint's"})
    assert str(info.value) == "mesh.yaml: tracing.port: port 18001 is the status endpoint's"


async def test_a_reload_starts_moves_and_stops_the_control_planes_receiver(
    tmp_path: Path,
) -> None:
    ports = distinct_ports("xds", "a", "b")
    path = tmp_path / "mesh.yaml"
    body = (
        f"xds: {{port: {ports['xds']}}}\n"
        "services: [{name: web, port: 9080, endpoints: [{port: 9101}]}]\n"
    )
    path.write_text(body)
    cp = ControlPlane(path, status_port=0, ca_dir=tmp_path / "ca", on_event=lambda _: None)
    await cp.start()
    try:
        assert cp.collector.store is None and cp.status()["tracing"] is None
        path.write_text(body + f"tracing: {{port: {ports['a']}}}\n")
        assert await cp.reload() is True
        assert listening(ports["a"])
        assert cp.status()["tracing"]["address"] == f"127.0.0.1:{ports['a']}"
        path.write_text(body + f"tracing: {{port: {ports['b']}, sampling: 5}}\n")
        assert await cp.reload() is True
        assert listening(ports["b"]) and not listening(ports["a"])
        path.write_text(body)
        assert await cp.reload() is True
        assert not listening(ports["b"]) and cp.collector.store is None
    finally:
        await cp.stop()


async def test_a_reload_turns_the_receivers_mtls_on_and_off(tmp_path: Path) -> None:
    """The control plane issues the receiver its certificate with the mesh's mTLS and serves it
    (a plaintext exporter refused at the handshake); ``tracing.tls: none`` turns it back into
    plaintext on the same port, the traces kept."""
    ports = distinct_ports("xds", "col")
    path = tmp_path / "mesh.yaml"
    body = (
        f"xds: {{port: {ports['xds']}}}\n"
        "mtls: {mode: strict, ca_dir: ca}\n"
        "services: [{name: web, port: 9080, endpoints: [{port: 9101}]}]\n"
        f"tracing: {{port: {ports['col']}}}\n"
    )
    path.write_text(body)
    cp = ControlPlane(path, status_port=0, ca_dir=tmp_path / "ca", on_event=lambda _: None)
    await cp.start()
    try:
        status = cp.status()
        assert status["tracing"]["tls"] == "mesh"
        assert status["mtls"]["services"]["tracing"]["spiffe_id"] == (
            "spiffe://cluster.local/ns/default/sa/legation-tracing"
        )
        plain = await asyncio.to_thread(export_one, ports["col"], 1, service="web")
        assert plain is grpc.StatusCode.UNAVAILABLE
        assert cp.issuer.ca is not None  # a workload of the mesh (web has no sidecar here)
        web = cp.issuer.ca.issue("spiffe://cluster.local/ns/default/sa/web", ttl=timedelta(hours=1))
        bundle = cp.issuer.bundle_pem
        served = await asyncio.to_thread(
            export_one, ports["col"], 2, service="web", cert=web, trusted=bundle
        )
        assert served is grpc.StatusCode.OK
        path.write_text(body[: -len("}\n")] + ", tls: none}\n")
        assert await cp.reload() is True
        assert cp.status()["tracing"]["tls"] == "none"
        assert "tracing" not in cp.status()["mtls"]["services"]
        plain = await asyncio.to_thread(export_one, ports["col"], 3, service="web")
        assert plain is grpc.StatusCode.OK
        assert cp.collector.store is not None
        assert {s[0].trace_id for s in cp.collector.store.traces()} == {
            f"{2:032x}",
            f"{3:032x}",
        }
    finally:
        await cp.stop()
