"""Mesh mTLS with real Envoys and real TLS: the control plane (CA, SDS over ADS) serves a gateway
and two strict sidecars. Gateway -> sidecar traffic is mTLS and carries the caller's SPIFFE id;
plaintext clients and clients with another CA's certificate are refused at the sidecar; a forced
rotation reaches Envoy over SDS (the serial in /certs changes) with no restart, traffic flowing.
"""

from __future__ import annotations

import json
import socket
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest

from legation.certs import CertificateAuthority, WorkloadCert
from legation.demo import DemoApp
from legation.envoy_process import EnvoyProcess
from tests.conftest import distinct_ports
from tests.envoy_stack import MeshWorld

pytestmark = [pytest.mark.integration, pytest.mark.slow]

T = TypeVar("T")
GATEWAY_ID = "spiffe://cluster.local/ns/default/sa/ingress"
REVIEWS_ID = "spiffe://cluster.local/ns/default/sa/reviews"

MESH = """\
xds: {{port: {xds}}}
mtls: {{mode: {mode}, ca_dir: ca, cert_ttl: 1h}}
gateway: {{port: {gw}, admin_port: {gw_admin}}}
services:
  - name: reviews
    port: 9080
    subsets:
      - {{name: v1, labels: {{version: v1}}}}
      - {{name: v2, labels: {{version: v2}}}}
    endpoints:
      - {{name: reviews-v1, port: {app1}, labels: {{version: v1}},
         sidecar: {{inbound_port: {in1}, outbound_port: {out1}, admin_port: {admin1}}}}}
      - {{name: reviews-v2, port: {app2}, labels: {{version: v2}},
         sidecar: {{inbound_port: {in2}, outbound_port: {out2}, admin_port: {admin2}}}}}
routes:
  - name: v2
    gateway: true
    mesh_hosts: [reviews]
    match: {{headers: [{{name: x-version, exact: v2}}]}}
    to: {{service: reviews, subset: v2}}
  - name: rest
    gateway: true
    to: {{service: reviews, subset: v1}}
"""


def http(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, {}


class World(MeshWorld):
    def __init__(self, tmp: Path, mode: str = "strict") -> None:
        self.apps = {v: DemoApp(name="reviews", version=v).start_in_thread() for v in ("v1", "v2")}
        names = ("xds", "gw", "gw_admin", "in1", "out1", "admin1", "in2", "out2", "admin2")
        self.ports = distinct_ports(*names)
        mesh_path = tmp / "mesh.yaml"
        mesh_path.write_text(
            MESH.format(
                **self.ports, mode=mode, app1=self.apps["v1"].port, app2=self.apps["v2"].port
            )
        )
        super().__init__(tmp, mesh_path)

    def rotate(self) -> list[str]:
        async def go() -> list[str]:
            return self.cp.rotate(force=True)

        return self.loop.run(go())

    def cert(self, node: str) -> WorkloadCert:
        return self.cp.issuer.certs[node]

    def close(self) -> None:
        super().close()
        for app in self.apps.values():
            app.stop_thread()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    w = World(tmp_path_factory.mktemp("mtls"))
    try:
        w.start()
        yield w
    finally:
        w.close()


def envoy_cert(envoy: EnvoyProcess) -> dict[str, Any]:
    """The proxy's mesh certificate as its admin /certs shows it (not the CA, and not its xDS
    credential, which /certs lists too, in no fixed order)."""
    for entry in json.loads(envoy.admin_get("/certs"))["certificates"]:
        for cert in entry.get("cert_chain") or []:
            uris = [san.get("uri", "") for san in cert.get("subject_alt_names", [])]
            if any(uri.startswith("spiffe://cluster.local/") for uri in uris):
                return cert  # type: ignore[no-any-return]
    raise AssertionError("no mesh certificate in /certs")


def tls_request(port: int, ca_pem: bytes, cert: WorkloadCert | None, tmp: Path) -> bytes:
    """GET / over TLS to a sidecar's inbound port, presenting ``cert``; the bytes answered
    (empty or an exception when the server refuses)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False  # SPIFFE ids are URI SANs, not host names
    (tmp / "roots.pem").write_bytes(ca_pem)
    ctx.load_verify_locations(tmp / "roots.pem")
    if cert is not None:
        (tmp / "client.crt").write_bytes(cert.cert_pem)
        (tmp / "client.key").write_bytes(cert.key_pem)
        ctx.load_cert_chain(tmp / "client.crt", tmp / "client.key")
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with ctx.wrap_socket(raw) as tls:
            tls.sendall(b"GET /direct HTTP/1.1\r\nhost: reviews\r\nconnection: close\r\n\r\n")
            chunks = []
            for _ in range(100):  # bounded: the demo app answers in a few chunks
                data = tls.recv(65536)
                if not data:
                    break
                chunks.append(data)
            return b"".join(chunks)


def test_gateway_to_sidecar_is_mtls_with_the_callers_identity(world: World) -> None:
    status, body = http(world.ports["gw"], "/reviews", {"x-version": "v2"})
    assert (status, body["version"]) == (200, "v2")
    # the sidecar verified the gateway's certificate and told the app who called
    xfcc = body["headers"]["x-forwarded-client-cert"]
    assert f"URI={GATEWAY_ID}" in xfcc
    status, body = http(world.ports["gw"], "/reviews")
    assert (status, body["version"]) == (200, "v1")
    handshakes = world.envoys["sidecar-reviews-v1"].stats(r"^listener\.inbound_reviews\.ssl\.")
    assert handshakes["listener.inbound_reviews.ssl.handshake"] >= 1
    # an app's request through its sidecar's outbound listener is mTLS as well
    status, body = http(world.ports["out1"], "/reviews", {"host": "reviews", "x-version": "v2"})
    assert (status, body["version"]) == (200, "v2")
    assert f"URI={REVIEWS_ID}" in body["headers"]["x-forwarded-client-cert"]


def test_envoy_serves_the_issued_certificate(world: World) -> None:
    for node in ("sidecar-reviews-v1", "gateway-ingress"):
        shown = envoy_cert(world.envoys[node])
        issued = world.cert(node)
        assert int(shown["serial_number"], 16) == issued.serial
        assert {"uri": issued.spiffe_id} in shown["subject_alt_names"]
    status = world.status()
    assert status["mtls"]["ca"]["fingerprint_sha256"] == world.cp.issuer.ca.fingerprint  # type: ignore[union-attr]
    by_node = {p["node_id"]: p for p in status["proxies"]}
    assert by_node["sidecar-reviews-v2"]["certificate"]["spiffe_id"] == REVIEWS_ID
    assert "PRIVATE KEY" not in json.dumps(status)


def test_strict_sidecar_refuses_plaintext_and_strangers(world: World, tmp_path: Path) -> None:
    inbound = world.ports["in1"]
    with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
        http(inbound, "/plaintext")
    ca = world.cp.issuer.ca
    assert ca is not None
    # control: a client with a certificate from the mesh's CA is served
    member = ca.issue(REVIEWS_ID, ttl=timedelta(minutes=5))
    answer = tls_request(inbound, ca.root_pem, member, tmp_path)
    assert answer.startswith(b"HTTP/1.1 200")
    # the same client with a certificate from another CA, or none, is refused
    stranger = CertificateAuthority.generate(trust_domain="cluster.local").issue(
        REVIEWS_ID, ttl=timedelta(minutes=5)
    )
    for cert in (stranger, None):
        try:
            refused = tls_request(inbound, ca.root_pem, cert, tmp_path)
        except (ssl.SSLError, ConnectionError):
            refused = b""
        assert not refused.startswith(b"HTTP/"), cert
    ssl_stats = world.envoys["sidecar-reviews-v1"].stats(r"^listener\.inbound_reviews\.ssl\.")
    assert ssl_stats["listener.inbound_reviews.ssl.connection_error"] >= 1


def test_rotation_reaches_envoy_over_sds_without_restart(world: World) -> None:
    sidecar = world.envoys["sidecar-reviews-v1"]
    pid = sidecar.proc.pid if sidecar.proc else None
    before = world.cert("sidecar-reviews-v1").serial
    sds_before = sidecar.stats(r"^sds\..*update_success$")
    assert sorted(world.rotate()) == sorted(world.envoys)
    after = world.cert("sidecar-reviews-v1").serial
    assert after != before
    deadline = time.monotonic() + 10
    while int(envoy_cert(sidecar)["serial_number"], 16) != after:
        assert time.monotonic() < deadline, envoy_cert(sidecar)
        time.sleep(0.05)
    world.wait_in_sync()
    assert sidecar.alive() and sidecar.proc is not None and sidecar.proc.pid == pid
    sds_after = sidecar.stats(r"^sds\..*update_success$")
    assert sum(sds_after.values()) > sum(sds_before.values())
    # traffic keeps flowing, through the sidecars' new certificates
    for version in ("v1", "v2", "v1"):
        status, body = http(world.ports["gw"], "/reviews", {"x-version": version})
        assert (status, body["version"]) == (200, version)
    dump = sidecar.config_dump("dynamic_active_secrets")
    names = sorted(s["name"] for s in dump["configs"])
    # the mesh's two from ADS, and the proxy's xDS credential from its watched file
    assert names == ["legation-trust-bundle", "legation-workload-cert", "legation-xds-client"]
    assert "BEGIN EC PRIVATE" not in json.dumps(dump) and "BEGIN PRIVATE" not in json.dumps(dump)


def test_permissive_sidecar_takes_plaintext_and_mtls(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    w = World(tmp_path_factory.mktemp("mtls-permissive"), mode="permissive")
    try:
        w.start()
        status, body = http(w.ports["in1"], "/plaintext")  # a client outside the mesh
        assert (status, body["version"]) == (200, "v1")
        assert "x-forwarded-client-cert" not in body["headers"]
        status, body = http(w.ports["gw"], "/reviews")  # the gateway still speaks mTLS
        assert (status, body["version"]) == (200, "v1")
        assert f"URI={GATEWAY_ID}" in body["headers"]["x-forwarded-client-cert"]
        stats = w.envoys["sidecar-reviews-v1"].stats(r"^listener\.inbound_reviews\.ssl\.handshake$")
        assert stats["listener.inbound_reviews.ssl.handshake"] >= 1
    finally:
        w.close()
