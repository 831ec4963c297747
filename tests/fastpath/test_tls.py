"""The HTTP call-out over mutual TLS: a client certificate from the CA is required, and a renewed
server certificate (a new answer from the TLS source) is served from the next handshake on."""

from __future__ import annotations

import asyncio
import ssl
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509
from prometheus_client import CollectorRegistry

from legation.certs.ca import CertificateAuthority
from legation.certs.workload import WorkloadCert
from legation.fastpath.server import Settings, start_server
from legation.grpc_server import ServerTls
from tests.fastpath.cases import CLIENT_HEADERS, UPSTREAM_HEADERS, service_config
from tests.fastpath.conftest import policy_dir

pytestmark = pytest.mark.either_loop  # on asyncio's loop and on uvloop, as served

SERVER_ID = "spiffe://test.local/ns/default/sa/legation-extauthz"
CALL = (
    b"GET /legation/check/allow HTTP/1.1\r\nhost: web\r\nx-tenant: t1\r\n"
    b"x-legation-policy: fast.test\r\ncontent-length: 0\r\n\r\n"
)


def client_context(
    ca: CertificateAuthority, cert: WorkloadCert | None, tmp: Path
) -> ssl.SSLContext:
    context = ssl.create_default_context(cadata=ca.root_pem.decode())
    context.check_hostname = False  # the SPIFFE id is a URI SAN; Envoy pins it, not tested here
    if cert is not None:
        (tmp / "c.pem").write_bytes(cert.cert_pem)
        (tmp / "k.pem").write_bytes(cert.key_pem)
        context.load_cert_chain(tmp / "c.pem", tmp / "k.pem")
    return context


async def call(port: int, context: ssl.SSLContext) -> tuple[int, int]:
    """(the answer's status, the serial of the certificate the server presented)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
    try:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        writer.write(CALL)
        head = await reader.readuntil(b"\r\n\r\n")
        return int(head.split(b" ", 2)[1]), x509.load_der_x509_certificate(der).serial_number
    finally:
        writer.close()


async def test_mutual_tls_and_renewal(tmp_path: Path, table_plugin: object) -> None:
    ca = CertificateAuthority.in_directory(tmp_path / "ca", trust_domain="test.local")
    first, second = (ca.issue(SERVER_ID, ttl=timedelta(hours=1)) for _ in range(2))
    current = [
        ServerTls(cert_chain_pem=first.cert_pem, key_pem=first.key_pem, client_ca_pem=ca.root_pem)
    ]
    server = await start_server(
        Settings(
            config=service_config(policy_dir(tmp_path)),
            registry=CollectorRegistry(),
            upstream_headers=UPSTREAM_HEADERS,
            client_headers=CLIENT_HEADERS,
            tls=lambda: current[0],
        )
    )
    try:
        client = ca.issue("spiffe://test.local/ns/default/sa/gateway", ttl=timedelta(hours=1))
        trusted = client_context(ca, client, tmp_path)
        status, serial = await call(server.port, trusted)
        assert (status, serial) == (
            200,
            x509.load_pem_x509_certificate(first.cert_pem).serial_number,
        )

        current[0] = ServerTls(
            cert_chain_pem=second.cert_pem, key_pem=second.key_pem, client_ca_pem=ca.root_pem
        )
        status, serial = await call(server.port, trusted)
        assert (status, serial) == (
            200,
            x509.load_pem_x509_certificate(second.cert_pem).serial_number,
        )

        with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
            await call(server.port, client_context(ca, None, tmp_path))  # no client certificate
    finally:
        await server.close()
