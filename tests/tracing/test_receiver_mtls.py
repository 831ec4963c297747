"""The embedded receiver on mesh mTLS, and Legation's exporter as its client, over real TLS with
certificates from a real :class:`~legation.certs.MeshIssuer`: a service exports with its own
certificate and only to the receiver's identity, never in plaintext; renewals open a new
channel, and a root rotation's overlap takes both roots; the receiver follows the block's TLS
(restarted when it turns on or off, its traces kept) and lets each peer export under its own
name only."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SpanExportResult

from legation.certs import MeshIssuer
from legation.certs.roots import Phase, request_rotation
from legation.config.model import Mesh
from legation.config.tracing import Tracing
from legation.errors import LegationError
from legation.tracing.exporter import OtlpExporter
from legation.tracing.receiver import EmbeddedCollector, PeerCheck, TraceReceiver
from legation.tracing.store import TraceStore
from tests.config.meshdata import base, parse
from tests.conftest import free_port
from tests.tracing.clients import export_one

PREFIX = "spiffe://cluster.local/ns/default/sa/"


@dataclass
class Pki:
    mesh: Mesh
    issuer: MeshIssuer


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    data = base()
    data["mtls"] = {"mode": "strict"}
    data["tracing"] = {}
    mesh = parse(data)
    issuer = MeshIssuer(mesh_dir=tmp_path, default_ca_dir=tmp_path / "ca")
    issuer.update(mesh, services={"extauthz": "127.0.0.1", "tracing": "127.0.0.1"})
    return Pki(mesh, issuer)


@pytest.fixture
async def receiver(pki: Pki) -> AsyncIterator[TraceReceiver]:
    r = TraceReceiver(
        TraceStore(max_traces=10, max_spans=100),
        tls=lambda: pki.issuer.service_tls("tracing"),
        peers=PeerCheck.of(pki.mesh),
    )
    await r.start()
    try:
        yield r
    finally:
        await r.stop(0)


def sdk_span(name: str) -> ReadableSpan:
    span = TracerProvider().get_tracer("t").start_span(name)
    span.end()
    assert isinstance(span, ReadableSpan)
    return span


def exporter_of(pki: Pki, port: int, kind: str = "extauthz") -> OtlpExporter:
    return OtlpExporter(
        "127.0.0.1",
        port,
        service=f"legation-{kind}",
        tls=lambda: pki.issuer.service_tls(kind),
        server_name="legation-tracing",
    )


async def export(exporter: OtlpExporter, name: str) -> SpanExportResult:
    return await asyncio.to_thread(exporter.export, [sdk_span(name)])


async def test_a_service_exports_with_its_own_certificate_and_follows_renewals(
    pki: Pki, receiver: TraceReceiver
) -> None:
    exporter = exporter_of(pki, receiver.port)
    try:
        assert await export(exporter, "first") is SpanExportResult.SUCCESS
        held = pki.issuer.service_tls("extauthz")
        assert pki.issuer.rotate_services(force=True) == ["extauthz", "tracing"]
        assert pki.issuer.service_tls("extauthz") is not held
        assert await export(exporter, "renewed") is SpanExportResult.SUCCESS
        assert exporter._held is pki.issuer.service_tls("extauthz")  # a new channel
    finally:
        exporter.shutdown()
    kept = {(s.service, s.name) for spans in receiver.store.traces() for s in spans}
    assert kept == {("legation-extauthz", "first"), ("legation-extauthz", "renewed")}
    assert receiver.refused == 0


async def test_the_exporter_talks_only_to_the_receivers_identity(pki: Pki) -> None:
    """A server with a mesh certificate of another name (here ext_authz's) is not the
    receiver: the export fails before any span is sent."""
    impostor = TraceReceiver(
        TraceStore(max_traces=10, max_spans=100), tls=lambda: pki.issuer.service_tls("extauthz")
    )
    await impostor.start()
    exporter = exporter_of(pki, impostor.port)
    try:
        assert await export(exporter, "secret") is SpanExportResult.FAILURE
        assert exporter.failures == 1
    finally:
        exporter.shutdown()
        await impostor.stop(0)
    assert impostor.store.traces() == []


async def test_no_certificate_fails_the_export_rather_than_going_plaintext(pki: Pki) -> None:
    plaintext = await TraceReceiver(TraceStore(max_traces=10, max_spans=100)).start()
    exporter = exporter_of(pki, plaintext.port, kind="ratelimit")  # no certificate issued
    try:
        assert await export(exporter, "x") is SpanExportResult.FAILURE
    finally:
        exporter.shutdown()
        await plaintext.stop(0)
    assert plaintext.store.traces() == []


async def test_the_collector_follows_the_blocks_tls_keeping_its_traces(pki: Pki) -> None:
    port = free_port()
    collector = EmbeddedCollector(tls_source=pki.issuer.service_tls)
    tracing = Tracing(port=port)
    front = pki.issuer.certs["sidecar-reviews-0"]
    bundle = pki.issuer.bundle_pem
    try:
        await collector.follow(tracing)
        plain = await asyncio.to_thread(export_one, port, 1, service="reviews")
        assert plain is grpc.StatusCode.OK
        await collector.follow(tracing, peers=PeerCheck.of(pki.mesh))  # restarted on mTLS
        assert collector.store is not None and collector.store.trace(f"{1:032x}") is not None
        refused = await asyncio.to_thread(export_one, port, 2, service="reviews")
        assert refused is grpc.StatusCode.UNAVAILABLE
        served = await asyncio.to_thread(
            export_one, port, 3, service="reviews", cert=front, trusted=bundle
        )
        assert served is grpc.StatusCode.OK
        without = EmbeddedCollector(tls_source=lambda kind: None)
        with pytest.raises(LegationError, match="tracing: no mesh certificate"):
            await without.follow(tracing, peers=PeerCheck.of(pki.mesh))
        assert without.receiver is None
        await collector.follow(tracing)  # back to plaintext
        plain = await asyncio.to_thread(export_one, port, 4, service="reviews")
        assert plain is grpc.StatusCode.OK
        assert {f"{t:032x}" for t in (1, 3, 4)} == {
            spans[0].trace_id for spans in collector.store.traces()
        }
    finally:
        await collector.stop()


@pytest.mark.parametrize(
    ("peer", "services", "allowed"),
    [
        (PREFIX + "reviews", {"reviews"}, True),
        (PREFIX + "reviews", {"reviews", "ingress"}, False),
        (PREFIX + "reviews", {"legation-extauthz"}, False),
        (PREFIX + "legation-extauthz", {"legation-extauthz", "legation-ratelimit"}, True),
        (PREFIX + "legation-extauthz", {"reviews"}, False),
        ("spiffe://other.test/ns/default/sa/reviews", {"reviews"}, False),
        ("spiffe://cluster.local/ns/shop/sa/reviews", {"reviews"}, False),
        (None, {"reviews"}, False),
        (PREFIX + "reviews", {"?"}, False),
    ],
)
def test_a_peer_exports_under_its_own_name_only(
    pki: Pki, peer: str | None, services: set[str], allowed: bool
) -> None:
    assert PeerCheck.of(pki.mesh).allows(peer, services) is allowed


async def test_a_root_rotation_keeps_both_roots_through_its_overlap(
    pki: Pki, receiver: TraceReceiver, tmp_path: Path
) -> None:
    """Certificates of the old root are taken until the old root is retired; the receiver's and
    the exporter's new certificates (from the new root) work from the moment they are issued."""
    exporter = exporter_of(pki, receiver.port)
    old_proxy = pki.issuer.certs["sidecar-reviews-0"]
    try:
        request_rotation(tmp_path / "ca", overlap=timedelta(0))
        assert pki.issuer.reload_roots()  # trust: both roots in the bundle
        assert await export(exporter, "trust") is SpanExportResult.SUCCESS
        pki.issuer.advance_root(Phase.ISSUE)  # every certificate re-issued from the new root
        assert pki.issuer.certs["sidecar-reviews-0"].serial != old_proxy.serial
        assert await export(exporter, "issue") is SpanExportResult.SUCCESS
        bundle = pki.issuer.bundle_pem
        overlap = await asyncio.to_thread(
            export_one, receiver.port, 7, service="reviews", cert=old_proxy, trusted=bundle
        )
        assert overlap is grpc.StatusCode.OK  # a proxy not yet renewed still gets through
        pki.issuer.advance_root(Phase.RETIRE)
        assert pki.issuer.root_phase is None
        retired = await asyncio.to_thread(
            export_one, receiver.port, 8, service="reviews", cert=old_proxy, trusted=bundle
        )
        assert retired is grpc.StatusCode.UNAVAILABLE
        assert await export(exporter, "after") is SpanExportResult.SUCCESS
    finally:
        exporter.shutdown()
    names = {s.name for spans in receiver.store.traces() for s in spans}
    assert {"trust", "issue", "after", "s0"} <= names
    assert receiver.store.trace(f"{8:032x}") is None


_NAMES = st.sampled_from(["reviews", "ingress", "legation-extauthz", "legation-tracing", "?", ""])


@given(
    peer=st.one_of(
        st.none(),
        st.text(max_size=60),
        st.builds(lambda tail: PREFIX + tail, st.one_of(_NAMES, st.text(max_size=20))),
    ),
    services=st.sets(st.one_of(_NAMES, st.text(max_size=20)), max_size=4),
)
def test_any_peer_and_names_allowed_only_as_its_own(peer: str | None, services: set[str]) -> None:
    check = PeerCheck(
        prefix=PREFIX, legation=frozenset({"legation-extauthz", "legation-ratelimit"})
    )
    if not check.allows(peer, services):
        return
    assert peer is not None and peer.startswith(PREFIX)
    own = peer[len(PREFIX) :]
    for name in services:  # each name is the peer's own, or both are Legation's services
        assert name == own or {name, own} <= check.legation
