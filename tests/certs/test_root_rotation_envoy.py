"""After a root rotation the old root is no longer trusted, through a real Envoy: a client holding
a certificate from the retired root is refused by a sidecar's inbound listener (strict mTLS),
one from the new root is served. Before the rotation the old-root client is served (the
control). The mesh and its Envoys are the fault suite's (:class:`tests.faults.scenarios.MtlsMesh`);
the control plane's own timer walks the phases, gated on the Envoys' ACKs."""

from __future__ import annotations

import socket
import ssl
from datetime import timedelta
from pathlib import Path

import pytest

from legation.certs import CertificateAuthority, WorkloadCert
from legation.certs.roots import request_rotation
from tests.faults.harness import Stack, wait_for
from tests.faults.scenarios import MtlsMesh, _served_roots

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CLIENT = "spiffe://cluster.local/ns/default/sa/tester"


def answer(port: int, client: WorkloadCert, server_roots: bytes, folder: Path) -> str:
    """The status line the sidecar answers ``client`` with, or the error that ended it."""
    folder.mkdir(mode=0o700, exist_ok=True)
    (folder / "cert.pem").write_bytes(client.cert_pem)
    (folder / "key.pem").write_bytes(client.key_pem)
    context = ssl.create_default_context(cadata=server_roots.decode())
    context.check_hostname = False  # the sidecar presents a SPIFFE id, no host name
    context.load_cert_chain(folder / "cert.pem", folder / "key.pem")
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
            context.wrap_socket(raw) as tls,
        ):
            tls.sendall(b"GET / HTTP/1.1\r\nhost: web\r\nconnection: close\r\n\r\n")
            return tls.recv(64).split(b"\r\n", 1)[0].decode() or "closed"
    except (ssl.SSLError, OSError) as err:
        return type(err).__name__


def test_a_client_of_the_retired_root_is_refused_by_a_sidecar(tmp_path: Path) -> None:
    with Stack(tmp_path) as stack:
        mesh = MtlsMesh(stack)
        ca_dir, port = tmp_path / "ca", mesh.ports["inb"]
        old = CertificateAuthority.load(ca_dir / "ca.crt", ca_dir / "ca.key")
        old_client = old.issue(CLIENT, ttl=timedelta(hours=1))
        assert answer(port, old_client, old.root_pem, tmp_path / "a") == "HTTP/1.1 200 OK"

        state = request_rotation(ca_dir, overlap=timedelta(0))
        wait_for(
            lambda: stack.status()["mtls"]["ca"]["trusted"] == [state.new],
            30,
            "the rotation through to the old root's retirement",
        )
        new = CertificateAuthority.load(ca_dir / "ca.crt", ca_dir / "ca.key")
        assert new.fingerprint == state.new
        sidecar = next(n for n in stack.envoys if n.startswith("sidecar-"))
        root_serial = format(new.cert.serial_number, "x")
        wait_for(
            lambda: _served_roots(stack, sidecar)[1] == {root_serial},
            10,
            "the sidecar's Envoy trusting the new root only",
        )

        refused = answer(port, old_client, new.root_pem, tmp_path / "b")
        assert not refused.startswith("HTTP/"), refused
        new_client = new.issue(CLIENT, ttl=timedelta(hours=1))
        assert answer(port, new_client, new.root_pem, tmp_path / "c") == "HTTP/1.1 200 OK"
