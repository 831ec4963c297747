"""The xDS enrolment review, attacked again: one test (or a few) per finding.

1. An xDS enrolment credential (issued for any node id) passed for a mesh peer: a strict-mTLS
   sidecar served it, and so did the request-path services. Now a separate xDS root signs it,
   the mesh trust bundle is the mesh root only, and the inbound TLS context also requires a
   ``spiffe://<trust domain>/`` URI SAN.
2. A failed read of the enrolment registry refused every proxy until the file changed; idle
   pre-TLS connections held descriptors for 120 s.
3. A node with no snapshot of its own got another node's config by naming it as its cluster.
4. Two processes creating the CA, or enrolling one node, at once.
5. CA and credential directories (and the CA key's owner) were not checked.
6. One client could make the xDS server log a warning per call.
7. A node credential that is a CA certificate, or has no clientAuth usage, was accepted.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import multiprocessing
import os
import socket
import ssl
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from envoy.service.discovery.v3 import discovery_pb2

from legation.certs import _files
from legation.certs.ca import CertificateAuthority
from legation.certs.enrol import Enrolments, NodeFiles, enrol, node_uri, xds_root
from legation.certs.errors import CertError
from legation.certs.workload import WorkloadCert
from legation.controlplane import ControlPlane
from legation.xds.auth import RefusalLog
from legation.xds.cache import SnapshotCache
from legation.xds.server import HANDSHAKE_TIMEOUT
from legation.xds.types import ResourceType as T
from tests.security.test_service_mtls import (
    GATEWAY_NODE,
    KINDS,
    address,
    assert_refused,
    assert_served,
    call,
    mesh_root,
    start_plane,
    tls_channel,
    write_mesh,
)
from tests.security.test_xds_enrolment import (
    ADS,
    KEY_MARK,
    first_responses,
    request,
    secret_snapshot,
)
from tests.xds.pki import TestPki

SDS = "/envoy.service.secret.v3.SecretDiscoveryService/"


async def fetch(channel: grpc.aio.Channel, rtype: T, node: str, **kw: Any) -> bytes:
    method = {
        T.SECRET: SDS + "FetchSecrets",
        T.LISTENER: "/envoy.service.listener.v3.ListenerDiscoveryService/FetchListeners",
        T.CLUSTER: "/envoy.service.cluster.v3.ClusterDiscoveryService/FetchClusters",
    }[rtype]
    call_ = channel.unary_unary(
        method, request_serializer=discovery_pb2.DiscoveryRequest.SerializeToString
    )
    return await call_(request(node, rtype, **kw), timeout=5)  # type: ignore[no-any-return]


def xds_channel(cp: ControlPlane, cert: WorkloadCert, root: bytes) -> grpc.aio.Channel:
    assert cp.server is not None
    creds = grpc.ssl_channel_credentials(
        root_certificates=root, private_key=cert.key_pem, certificate_chain=cert.cert_pem
    )
    return grpc.aio.secure_channel(
        cp.server.address, creds, options=[("grpc.use_local_subchannel_pool", 1)]
    )


# -- 1. an xDS credential is no mesh identity, a workload certificate no xDS credential ----------


async def test_the_xds_root_is_not_the_mesh_root_and_lives_beside_it(tmp_path: Path) -> None:
    cp = await start_plane(write_mesh(tmp_path, mode="strict"))
    try:
        assert cp.xds_ca is not None and cp.issuer.ca is not None
        assert cp.xds_ca.fingerprint != cp.issuer.ca.fingerprint
        home = Path(cp.issuer.ca.source)
        assert cp.xds_ca.source == str(home / "xds")
        assert (home / "xds" / "ca.key").stat().st_mode & 0o777 == 0o600
        assert (home / "xds").stat().st_mode & 0o777 == 0o700
        cert, files = cp.enrol("stranger", tmp_path / "nodes" / "stranger")
        leaf = x509.load_pem_x509_certificate(cert.cert_pem)
        leaf.verify_directly_issued_by(cp.xds_ca.cert)
        assert files.root.read_bytes() == cp.xds_ca.root_pem  # proxies verify the xDS root
        assert cp.server is not None and cp.server.auth is not None
        serving = x509.load_pem_x509_certificate(cp.server.auth._serving.cert_pem)  # type: ignore[attr-defined]
        serving.verify_directly_issued_by(cp.xds_ca.cert)
    finally:
        await cp.stop()


@pytest.mark.parametrize("kind", KINDS)
async def test_services_refuse_an_xds_credential(tmp_path: Path, kind: str) -> None:
    """p2: the credential of a node enrolled under any id spent another caller's budget."""
    cp = await start_plane(write_mesh(tmp_path, mode="strict"))
    try:
        stranger, _ = cp.enrol("stranger", tmp_path / "nodes" / "stranger")
        async with tls_channel(address(cp, kind), mesh_root(cp), stranger) as channel:
            assert_refused(kind, await call(kind, channel))
        assert cp.server is not None and cp.server.auth is not None
        server_cert = cp.server.auth._serving  # type: ignore[attr-defined]
        async with tls_channel(address(cp, kind), mesh_root(cp), server_cert) as channel:
            assert_refused(kind, await call(kind, channel))
        async with tls_channel(
            address(cp, kind), mesh_root(cp), cp.issuer.certs[GATEWAY_NODE]
        ) as channel:
            assert_served(kind, await call(kind, channel))
    finally:
        await cp.stop()


async def test_xds_server_refuses_a_workload_certificate_at_the_handshake(tmp_path: Path) -> None:
    cp = await start_plane(write_mesh(tmp_path, mode="strict"))
    try:
        assert cp.xds_ca is not None
        workload = cp.issuer.certs[GATEWAY_NODE]
        async with xds_channel(cp, workload, cp.xds_ca.root_pem) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await fetch(channel, T.SECRET, GATEWAY_NODE, names=("legation-workload-cert",))
        assert err.value.code() is grpc.StatusCode.UNAVAILABLE  # no TLS session at all
    finally:
        await cp.stop()


def _https_get(port: int, cert: WorkloadCert | None, ca: Path, tmp: Path) -> str:
    """The status line a strict sidecar inbound answers (or the TLS failure)."""
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.check_hostname = False
    if cert is not None:
        (tmp / "c.pem").write_bytes(cert.cert_pem)
        (tmp / "k.pem").write_bytes(cert.key_pem)
        ctx.load_cert_chain(tmp / "c.pem", tmp / "k.pem")
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
            ctx.wrap_socket(raw) as tls,
        ):
            tls.sendall(b"GET /tagged HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := tls.recv(65536):
                data += chunk
    except (OSError, ssl.SSLError) as err:
        return f"refused ({type(err).__name__})"
    return data.decode(errors="replace").split("\r\n", 1)[0]


@pytest.mark.integration
def test_strict_sidecar_inbound_refuses_an_xds_credential_through_envoy(tmp_path: Path) -> None:
    """p10: a real Envoy sidecar in strict mTLS served a request made with an xDS credential;
    it also refuses a certificate from the mesh root naming another trust domain (the SAN
    match behind the separate roots)."""
    from tests.integration.test_mesh_services import World

    world = World(tmp_path, mtls="strict")
    try:
        world.start()
        ca = tmp_path / "ca" / "ca.crt"
        port = world.ports["in1"]
        stranger, _ = world.cp.enrol("stranger", tmp_path / "nodes" / "stranger")
        assert world.cp.issuer.ca is not None
        foreign = world.cp.issuer.ca.issue(
            "spiffe://elsewhere.test/ns/default/sa/gw", ttl=timedelta(hours=1)
        )
        gateway = world.cp.issuer.certs["gateway-gw"]
        assert _https_get(port, gateway, ca, tmp_path).startswith("HTTP/1.1 200")
        assert _https_get(port, stranger, ca, tmp_path).startswith("refused")
        assert _https_get(port, foreign, ca, tmp_path).startswith("refused")
        assert _https_get(port, None, ca, tmp_path).startswith("refused")
    finally:
        world.close()


# -- 2. a failed registry read, idle connections ------------------------------------------------


def test_a_failed_registry_read_keeps_the_last_good_view(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """p4: EMFILE while the registry changed was cached as 'nobody is enrolled'."""
    ca = xds_root(tmp_path / "ca")
    pki_dir = tmp_path / "ca"
    cert_a, _ = enrol(ca, Enrolments.beside(pki_dir), "a", tmp_path / "nodes" / "a")
    server_view = Enrolments.beside(pki_dir)
    assert server_view.current("a") == cert_a.serial
    cert_b, _ = enrol(ca, Enrolments.beside(pki_dir), "b", tmp_path / "nodes" / "b")

    real = Path.read_bytes

    def emfile(self: Path) -> bytes:
        if self == server_view.path:
            raise OSError(24, "Too many open files")
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", emfile)
    assert server_view.current("a") == cert_a.serial  # the last good view still stands
    assert server_view.current("b") is None  # not yet known: refused as before
    monkeypatch.setattr(Path, "read_bytes", real)
    assert server_view.current("a") == cert_a.serial  # retried: the change is seen
    assert server_view.current("b") == cert_b.serial


def test_the_first_read_failing_refuses_everyone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ca = xds_root(tmp_path / "ca")
    enrol(ca, Enrolments.beside(tmp_path / "ca"), "a", tmp_path / "nodes" / "a")
    view = Enrolments.beside(tmp_path / "ca")
    view.path.write_bytes(b"{not json")
    assert view.current("a") is None
    (tmp_path / "ca" / "xds-nodes.json").unlink()
    assert view.current("a") is None


async def test_an_idle_connection_that_never_starts_tls_is_closed(tmp_path: Path) -> None:
    """p7: idle pre-TLS connections were kept for 120 s; the server now sets a handshake
    timeout (10 s by default; short here so the test does not wait)."""
    assert HANDSHAKE_TIMEOUT == 10.0
    pki = TestPki(tmp_path)
    server = await pki.server(SnapshotCache(debounce=0), port=0, handshake_timeout=0.5).start()
    try:
        idle = socket.create_connection(("127.0.0.1", server.port))
        idle.setblocking(False)
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(60):
            closed = await loop.sock_recv(idle, 4096)
        assert closed == b""
        idle.close()
    finally:
        await server.stop(0)


# -- 3. another node's id as a cluster ----------------------------------------------------------


async def test_a_node_naming_another_node_as_its_cluster_gets_nothing(tmp_path: Path) -> None:
    """p1: a node enrolled under any id got the gateway's listeners and clusters."""
    cp = await start_plane(write_mesh(tmp_path, mode="strict"))
    try:
        assert cp.xds_ca is not None
        cert, _ = cp.enrol("stranger", tmp_path / "nodes" / "stranger")
        async with xds_channel(cp, cert, cp.xds_ca.root_pem) as channel:
            for rtype in (T.LISTENER, T.CLUSTER, T.SECRET):
                got = await first_responses(
                    channel,
                    ADS + "StreamAggregatedResources",
                    request("stranger", rtype, cluster=GATEWAY_NODE),
                    discovery_pb2.DiscoveryResponse.FromString,
                    wait=0.5,
                )
                assert not any(r.resources for r in got), rtype
                fetched = await fetch(channel, rtype, "stranger", cluster=GATEWAY_NODE)
                assert not discovery_pb2.DiscoveryResponse.FromString(fetched).resources
    finally:
        await cp.stop()


# -- 4. races -----------------------------------------------------------------------------------


def test_a_ca_stored_by_someone_else_meanwhile_is_the_one_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The key is linked into place, never renamed over one that appeared meanwhile, and the
    CA returned is the one read back from disk."""
    directory = tmp_path / "ca"
    other = CertificateAuthority.generate(trust_domain="other")
    real_generate = CertificateAuthority.generate.__func__  # type: ignore[attr-defined]

    def generate_while_someone_stores(cls: type, /, **kw: Any) -> CertificateAuthority:
        other._store(directory)  # a writer that got there first
        return real_generate(cls, **kw)  # type: ignore[no-any-return]

    monkeypatch.setattr(
        CertificateAuthority, "generate", classmethod(generate_while_someone_stores)
    )
    ca = CertificateAuthority.in_directory(directory, trust_domain="x")
    assert ca.fingerprint == other.fingerprint
    on_disk = CertificateAuthority.load(directory / "ca.crt", directory / "ca.key")
    assert on_disk.fingerprint == other.fingerprint


def _open_ca(directory: str, barrier: Any, out: Any) -> None:
    barrier.wait()
    try:
        out.put(CertificateAuthority.in_directory(Path(directory), trust_domain="x").fingerprint)
    except Exception as err:  # reported to the parent
        out.put(f"error: {err}")


def test_two_processes_creating_the_ca_at_once_share_one(tmp_path: Path) -> None:
    """p5: processes opening a new CA directory at once each kept a CA of their own."""
    ctx = multiprocessing.get_context("fork")
    for trial in range(8):
        directory = tmp_path / f"t{trial}" / "ca"
        barrier, out = ctx.Barrier(2), ctx.Queue()
        procs = [
            ctx.Process(target=_open_ca, args=(str(directory), barrier, out)) for _ in range(2)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        got = {out.get(timeout=10), out.get(timeout=10)}
        on_disk = CertificateAuthority.load(directory / "ca.crt", directory / "ca.key")
        assert got == {on_disk.fingerprint}, got


def test_node_files_are_written_under_the_registry_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """p5: two enrolments of one node at once could leave the files holding the credential
    the registry had just revoked; the files and the serial are now written under one lock."""
    import legation.certs.enrol as enrol_module

    ca = xds_root(tmp_path / "ca")
    enrolments = Enrolments.beside(tmp_path / "ca")
    lock_path = enrolments.path.with_name(f".{enrolments.path.name}.lock")
    held: list[bool] = []
    real_write = enrol_module.write_node_files

    def write_and_probe(directory: Path, cert: WorkloadCert, root_pem: bytes) -> NodeFiles:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held.append(False)
        except BlockingIOError:
            held.append(True)
        finally:
            os.close(fd)
        return real_write(directory, cert, root_pem)

    monkeypatch.setattr(enrol_module, "write_node_files", write_and_probe)
    cert, files = enrol(ca, enrolments, "n", tmp_path / "nodes" / "n")
    assert held == [True]
    on_file = x509.load_pem_x509_certificate(files.read()[0])
    assert on_file.serial_number == cert.serial == Enrolments.beside(tmp_path / "ca").current("n")


def _enrol_one(directory: str, barrier: Any, out: Any) -> None:
    ca = xds_root(Path(directory) / "ca")
    barrier.wait()
    cert, _ = enrol(
        ca,
        Enrolments.beside(Path(directory) / "ca"),
        "node-x",
        Path(directory) / "nodes" / "node-x",
    )
    out.put(cert.serial)


def test_two_enrolments_of_one_node_at_once_agree_with_the_registry(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    for trial in range(8):
        directory = tmp_path / f"t{trial}"
        xds_root(directory / "ca")
        barrier, out = ctx.Barrier(2), ctx.Queue()
        procs = [
            ctx.Process(target=_enrol_one, args=(str(directory), barrier, out)) for _ in range(2)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        files = NodeFiles(directory / "nodes" / "node-x")
        on_file = x509.load_pem_x509_certificate(files.read()[0]).serial_number
        assert Enrolments.beside(directory / "ca").current("node-x") == on_file


# -- 5. directory and key ownership -------------------------------------------------------------


def test_a_ca_directory_writable_by_others_is_refused(tmp_path: Path) -> None:
    directory = tmp_path / "ca"
    directory.mkdir()
    directory.chmod(0o777)
    with pytest.raises(CertError) as err:
        CertificateAuthority.in_directory(directory, trust_domain="x")
    assert err.value.code == "ca_insecure"
    assert str(err.value) == (
        f"{directory}: the directory is writable by group or others (mode 0777), who could "
        f"replace the keys in it; run: chmod 700 {directory}"
    )
    assert not (directory / "ca.key").exists()


def test_a_credential_directory_writable_by_others_is_refused(tmp_path: Path) -> None:
    ca = xds_root(tmp_path / "ca")
    creds = tmp_path / "creds"
    creds.mkdir()
    creds.chmod(0o777)
    with pytest.raises(CertError) as err:
        enrol(ca, Enrolments.beside(tmp_path / "ca"), "n1", creds)
    assert f"{creds}: the directory is writable by group or others (mode 0777)" in str(err.value)
    assert not (creds / "xds-client.yaml").exists()
    assert Enrolments.beside(tmp_path / "ca").current("n1") is None


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give files away")
def test_a_ca_key_or_directory_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    directory = tmp_path / "ca"
    CertificateAuthority.in_directory(directory, trust_domain="x")
    os.chown(directory / "ca.key", 4242, 4242)
    with pytest.raises(CertError) as err:
        CertificateAuthority.load(directory / "ca.crt", directory / "ca.key")
    assert str(err.value) == (
        f"{directory / 'ca.key'}: the CA key is owned by uid 4242, not by this process (uid 0); "
        f"run: chown 0 {directory / 'ca.key'}"
    )
    os.chown(directory / "ca.key", 0, 0)
    os.chown(directory, 4242, 4242)
    with pytest.raises(CertError) as err:
        CertificateAuthority.in_directory(directory, trust_domain="x")
    assert str(err.value).startswith(f"{directory}: owned by uid 4242, not by this process")
    assert str(err.value).endswith(f"run: chown 0 {directory}")


def test_the_directory_check_is_the_one_private_dir_applies(tmp_path: Path) -> None:
    tmp_path.joinpath("g").mkdir(mode=0o770)
    tmp_path.joinpath("g").chmod(0o770)
    with pytest.raises(CertError, match="mode 0770"):
        _files.private_dir(tmp_path / "g")
    tmp_path.joinpath("r").mkdir()
    tmp_path.joinpath("r").chmod(0o755)  # readable is fine: the files in it are 0600
    _files.private_dir(tmp_path / "r")


# -- 6. refusal logs ----------------------------------------------------------------------------


def test_refusal_logs_are_limited_per_reason_and_summed_up() -> None:
    now = [100.0]
    limiter = RefusalLog(per_second=10, clock=lambda: now[0])
    admitted = [limiter.admit("not_a_node") for _ in range(100)]
    assert sum(ok for ok, _ in admitted) == 10
    assert limiter.admit("superseded") == (True, 0)  # reasons are limited separately
    now[0] += 1.0
    assert limiter.admit("not_a_node") == (True, 90)  # the next line tells what was left out
    assert limiter.admit("not_a_node") == (True, 0)


async def test_one_client_cannot_flood_the_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """p8: 2,000 calls with a non-node certificate made 2,000 warnings; all are still counted."""
    pki = TestPki(tmp_path)
    cache = SnapshotCache(debounce=0)
    server = await pki.server(cache, port=0).start()
    odd = pki.ca.issue("spiffe://test.local/ns/default/sa/a", ttl=timedelta(hours=1))
    calls = 400
    try:
        caplog.set_level(logging.WARNING, logger="legation.xds.auth")
        async with grpc.aio.secure_channel(server.address, pki.channel_credentials(odd)) as channel:

            async def one() -> None:
                with pytest.raises(grpc.aio.AioRpcError):
                    await fetch(channel, T.SECRET, "x")

            for _ in range(calls // 100):
                await asyncio.gather(*(one() for _ in range(100)))
        lines = [r for r in caplog.records if r.name == "legation.xds.auth"]
        assert cache.metrics.auth_refused.labels("not_a_node")._value.get() == calls
        assert 0 < len(lines) < calls
    finally:
        await server.stop(0)


# -- 7. what a node credential must be ----------------------------------------------------------


def _odd_credential(
    ca: CertificateAuthority, node: str, *, is_ca: bool, usages: list[x509.ObjectIdentifier] | None
) -> WorkloadCert:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "odd")]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(node_uri(node))]),
            critical=False,
        )
    )
    if usages is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    cert = builder.sign(ca._key, hashes.SHA256())
    return WorkloadCert(
        spiffe_id=node_uri(node),
        cert_pem=cert.public_bytes(serialization.Encoding.PEM),
        key_pem=key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        serial=cert.serial_number,
        issued_at=now,
        not_before=now,
        not_after=now + timedelta(hours=1),
    )


@pytest.mark.parametrize(
    ("is_ca", "usages"),
    [
        pytest.param(True, [ExtendedKeyUsageOID.CLIENT_AUTH], id="ca-true"),
        pytest.param(False, None, id="no-eku"),
    ],
)
async def test_a_node_credential_must_be_a_client_auth_leaf(
    tmp_path: Path, is_ca: bool, usages: list[x509.ObjectIdentifier] | None
) -> None:
    """p3 (needs the xDS root's key, so defence in depth): recorded as the node's current
    credential, a CA certificate or one without clientAuth still gets no key."""
    pki = TestPki(tmp_path)
    cache = SnapshotCache(debounce=0)
    server = await pki.server(cache, port=0).start()
    cache.set_snapshot("proxy-a", secret_snapshot(pki, "a"))
    odd = _odd_credential(pki.ca, "proxy-a", is_ca=is_ca, usages=usages)
    pki.enrolments.record("proxy-a", odd)
    try:
        async with grpc.aio.secure_channel(server.address, pki.channel_credentials(odd)) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                got = await fetch(channel, T.SECRET, "proxy-a", names=("legation-workload-cert",))
                assert KEY_MARK not in got
        assert err.value.code() is grpc.StatusCode.UNAUTHENTICATED
        assert cache.metrics.auth_refused.labels("bad_credential")._value.get() == 1
    finally:
        await server.stop(0)
