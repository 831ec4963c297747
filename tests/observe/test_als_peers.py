"""The access-log service with mTLS believes only the node a stream's certificate is: a proxy
naming another proxy's node is refused (found by an attacker review: any proxy could write
entries, golden metrics and JSON lines under another's name). Real TLS, real gRPC."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
from cryptography.x509.oid import ExtendedKeyUsageOID
from envoy.config.core.v3 import base_pb2
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2

from legation.certs.spiffe import peer_spiffe_id
from legation.grpc_server import ServerTls
from legation.observe.aggregator import Aggregator
from legation.observe.als import AccessLogServicer, start_als_server
from tests.xds.pki import TestPki

TD = "test.local"
REVIEWS = f"spiffe://{TD}/ns/default/sa/reviews"
GATEWAY = f"spiffe://{TD}/ns/default/sa/ingress"
IDENTITIES = {"sidecar-reviews-0": REVIEWS, "gateway-ingress": GATEWAY}
METHOD = "/envoy.service.accesslog.v3.AccessLogService/StreamAccessLogs"


def _messages(node: str) -> list[als_pb2.StreamAccessLogsMessage]:
    first = als_pb2.StreamAccessLogsMessage()
    first.identifier.node.CopyFrom(base_pb2.Node(id=node))
    first.identifier.log_name = "gateway"
    entry = accesslog_pb2.HTTPAccessLogEntry()
    entry.common_properties.route_name = "r"
    entry.response.response_code.value = 200
    first.http_logs.log_entry.append(entry)
    return [first]


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[AccessLogServicer, int, TestPki]]:
    pki = TestPki(tmp_path, trust_domain=TD)
    server_cert = pki.mesh_ca.issue_leaf(
        f"spiffe://{TD}/ns/default/sa/legation-accesslog",
        ttl=timedelta(hours=1),
        usages=[ExtendedKeyUsageOID.SERVER_AUTH],
        hosts=["127.0.0.1"],
    )
    tls = ServerTls(
        cert_chain_pem=server_cert.cert_pem,
        key_pem=server_cert.key_pem,
        client_ca_pem=pki.mesh_ca.root_pem,
    )
    servicer = AccessLogServicer(Aggregator(), identities=dict(IDENTITIES))
    server, port = await start_als_server(servicer, port=0, tls=tls)
    yield servicer, port, pki
    await server.stop(0)


async def _send(port: int, pki: TestPki, spiffe: str, node: str) -> grpc.StatusCode:
    """One stream naming ``node`` from a peer whose certificate is ``spiffe``."""
    return await _send_raw(port, pki, spiffe, _messages(node))


async def test_a_proxy_writes_under_its_own_node_only(
    served: tuple[AccessLogServicer, int, TestPki],
) -> None:
    servicer, port, pki = served
    assert await _send(port, pki, REVIEWS, "sidecar-reviews-0") is grpc.StatusCode.OK
    assert servicer.entries == 1 and servicer.refused == 0
    for claimed in ("gateway-ingress", "sidecar-unknown-0", "", "sidecar-reviews-0\n"):
        assert await _send(port, pki, REVIEWS, claimed) is grpc.StatusCode.PERMISSION_DENIED
    assert servicer.entries == 1 and servicer.refused == 4  # nothing recorded for them
    assert await _send(port, pki, GATEWAY, "gateway-ingress") is grpc.StatusCode.OK
    assert servicer.entries == 2


def test_peer_spiffe_id_reads_one_spiffe_uri_or_nothing(tmp_path: Path) -> None:
    pki = TestPki(tmp_path, trust_domain=TD)
    cert = pki.mesh_ca.issue(REVIEWS, ttl=timedelta(hours=1))
    assert peer_spiffe_id({"x509_pem_cert": [cert.cert_pem]}) == REVIEWS
    assert peer_spiffe_id({}) is None
    assert peer_spiffe_id({"x509_pem_cert": [b"not a certificate"]}) is None
    other = pki.mesh_ca.issue_leaf(
        "https://example.test/x", ttl=timedelta(hours=1), usages=[ExtendedKeyUsageOID.SERVER_AUTH]
    )
    assert peer_spiffe_id({"x509_pem_cert": [other.cert_pem]}) is None


async def _send_raw(
    port: int, pki: TestPki, spiffe: str, messages: list[als_pb2.StreamAccessLogsMessage]
) -> grpc.StatusCode:
    cert = pki.mesh_ca.issue(spiffe, ttl=timedelta(hours=1))
    creds = grpc.ssl_channel_credentials(
        root_certificates=pki.mesh_ca.root_pem,
        private_key=cert.key_pem,
        certificate_chain=cert.cert_pem,
    )
    async with grpc.aio.secure_channel(f"127.0.0.1:{port}", creds) as channel:
        call = channel.stream_unary(
            METHOD,
            request_serializer=als_pb2.StreamAccessLogsMessage.SerializeToString,
            response_deserializer=als_pb2.StreamAccessLogsResponse.FromString,
        )
        try:
            await asyncio.wait_for(call(iter(messages)), 10)
        except grpc.aio.AioRpcError as err:
            return err.code()
    return grpc.StatusCode.OK


async def test_entries_before_the_node_is_named_are_refused_and_the_cluster_is_the_meshs(
    served: tuple[AccessLogServicer, int, TestPki],
) -> None:
    """Two gaps an attacker review found: entries sent before (or without) an identifier were
    recorded unchecked, and the claimed node cluster named the source of pair metrics."""
    servicer, port, pki = served
    orphan = _messages("sidecar-reviews-0")[0]
    orphan.ClearField("identifier")
    assert await _send_raw(port, pki, REVIEWS, [orphan]) is grpc.StatusCode.PERMISSION_DENIED
    assert servicer.entries == 0
    servicer.clusters = {"sidecar-reviews-0": "reviews"}
    lying = _messages("sidecar-reviews-0")[0]
    lying.identifier.node.cluster = "payments"
    entry = lying.http_logs.log_entry[0]
    entry.common_properties.upstream_cluster = "outbound|9080||orders"
    assert await _send_raw(port, pki, REVIEWS, [lying]) is grpc.StatusCode.OK
    pairs = servicer.aggregator.snapshot().to_dict()["scopes"]["pair"]
    sources = {row["labels"]["source"] for row in pairs}
    assert sources == {"reviews"}, pairs
