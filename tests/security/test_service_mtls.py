"""The request-path services accept only the mesh's proxies when the mesh turns mTLS on.

A real control plane (strict mTLS, its ext_authz, ext_proc and rate-limit services embedded, on
loopback) is called directly, as an attacker on the network would: a plaintext gRPC client, a TLS
client without a certificate and one with a certificate from another CA are all refused at the
handshake; a client holding a proxy's workload certificate is served. The services present
``spiffe://cluster.local/ns/default/sa/legation-<kind>`` from the mesh CA, renew it without
dropping open streams, and stay plaintext when mTLS is off or the block says ``tls: none``.
The same stack through a real Envoy is ``tests/integration/test_mesh_services.py`` (strict).
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as proc_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as proc_grpc
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc

from legation.certs import CertificateAuthority, WorkloadCert
from legation.config import MeshConfigError, parse_mesh
from legation.controlplane import ControlPlane
from legation.extproc.config import CHAIN_METADATA_KEY
from legation.grpc_server import BindError, ServerTls, start_grpc_server
from tests.integration.test_mesh_services import distinct_ports

pytestmark = pytest.mark.either_loop  # on asyncio's loop and on uvloop, as served

REPO = Path(__file__).resolve().parents[2]
KINDS = ("extauthz", "extproc", "ratelimit")
GATEWAY_NODE = "gateway-gw"

AUTHZ_YAML = f"""\
checks:
  rego: {{type: rego, options: {{policy_dir: {REPO / "policies" / "quickstart"}}}}}
default_checks: [rego]
"""

LIMITS_YAML = """\
domain: test
descriptors:
  - key: generic_key
    value: limited
    rate_limit: {unit: minute, requests_per_unit: 100}
"""

MESH = """\
xds: {{port: {xds}}}
mtls: {{mode: {mode}, ca_dir: ca, cert_ttl: 1h}}
gateway: {{name: gw, port: {gw}, admin_port: {gw_admin}}}
extauthz: {{port: {extauthz}, config: authz.yaml{tls}}}
extproc: {{port: {extproc}{tls}}}
ratelimit: {{port: {ratelimit}, config: limits.yaml, domain: test{tls}}}
services:
  - name: web
    port: 9080
    endpoints: [{{port: {app}}}]
routes:
  - name: tagged
    gateway: true
    match: {{path: {{prefix: /tagged}}}}
    to: {{service: web}}
    filters: [{{name: headers, options: {{request: {{set: {{x-tag: one}}}}}}}}]
  - name: admin
    gateway: true
    match: {{path: {{prefix: /admin}}}}
    to: {{service: web}}
    authz: quickstart.authz
"""


def write_mesh(tmp: Path, *, mode: str, tls: str | None = None) -> Path:
    (tmp / "authz.yaml").write_text(AUTHZ_YAML)
    (tmp / "limits.yaml").write_text(LIMITS_YAML)
    names = ("xds", "gw", "gw_admin", "extauthz", "extproc", "ratelimit", "app")
    ports = distinct_ports(*names)
    path = tmp / "mesh.yaml"
    path.write_text(MESH.format(**ports, mode=mode, tls=f", tls: {tls}" if tls else ""))
    return path


async def start_plane(mesh: Path) -> ControlPlane:
    plane = ControlPlane(
        mesh,
        status_port=0,
        poll_interval=3600,
        on_event=lambda line: None,
        ca_dir=mesh.parent / "ca",
    )
    return await plane.start()


@pytest.fixture
async def plane(tmp_path: Path) -> AsyncIterator[ControlPlane]:
    cp = await start_plane(write_mesh(tmp_path, mode="strict"))
    try:
        yield cp
    finally:
        await cp.stop()


def address(cp: ControlPlane, kind: str) -> str:
    return cp.services.status()[kind]["address"]  # type: ignore[no-any-return]


def proxy_cert(cp: ControlPlane) -> WorkloadCert:
    """The gateway's workload certificate, as the control plane issued it to the proxy."""
    return cp.issuer.certs[GATEWAY_NODE]


def mesh_root(cp: ControlPlane) -> bytes:
    assert cp.issuer.ca is not None
    return cp.issuer.ca.root_pem


async def call(kind: str, channel: grpc.aio.Channel) -> Any:
    """One request to the service ``kind``; its answer, or the AioRpcError raised."""
    try:
        if kind == "extauthz":
            stub = external_auth_pb2_grpc.AuthorizationStub(channel)
            return await stub.Check(external_auth_pb2.CheckRequest(), timeout=5)
        if kind == "ratelimit":
            rls = rls_pb2_grpc.RateLimitServiceStub(channel)
            request = rls_pb2.RateLimitRequest(domain="test", hits_addend=1)
            entry = request.descriptors.add().entries.add()
            entry.key, entry.value = "generic_key", "limited"
            return await rls.ShouldRateLimit(request, timeout=5)
        proc = proc_grpc.ExternalProcessorStub(channel)
        stream = proc.Process(metadata=((CHAIN_METADATA_KEY, "tagged"),), timeout=5)
        await stream.write(proc_pb2.ProcessingRequest(request_headers=_headers()))
        answer = await stream.read()
        await stream.done_writing()
        return answer
    except grpc.aio.AioRpcError as err:
        return err


def _headers() -> proc_pb2.HttpHeaders:
    headers = proc_pb2.HttpHeaders(end_of_stream=True)
    for key, value in ((":path", "/tagged"), (":method", "GET"), (":authority", "web")):
        headers.headers.headers.append(base_pb2.HeaderValue(key=key, raw_value=value.encode()))
    return headers


def assert_served(kind: str, answer: Any) -> None:
    assert not isinstance(answer, grpc.aio.AioRpcError), (kind, answer)
    if kind == "extauthz":
        assert isinstance(answer, external_auth_pb2.CheckResponse)
    elif kind == "ratelimit":
        assert answer.overall_code == rls_pb2.RateLimitResponse.OK
    else:
        assert answer.WhichOneof("response") == "request_headers"


def assert_refused(kind: str, answer: Any) -> None:
    assert isinstance(answer, grpc.aio.AioRpcError), (kind, answer)
    assert answer.code() == grpc.StatusCode.UNAVAILABLE, (kind, answer.details())


def tls_channel(target: str, root: bytes, cert: WorkloadCert | None = None) -> grpc.aio.Channel:
    creds = grpc.ssl_channel_credentials(
        root_certificates=root,
        private_key=cert.key_pem if cert else None,
        certificate_chain=cert.cert_pem if cert else None,
    )
    # a channel of its own (no connection shared with another test's channel)
    return grpc.aio.secure_channel(target, creds, options=[("grpc.use_local_subchannel_pool", 1)])


@pytest.mark.parametrize("kind", KINDS)
async def test_plaintext_client_is_refused(plane: ControlPlane, kind: str) -> None:
    async with grpc.aio.insecure_channel(address(plane, kind)) as channel:
        assert_refused(kind, await call(kind, channel))


@pytest.mark.parametrize("kind", KINDS)
async def test_tls_client_without_a_certificate_is_refused(plane: ControlPlane, kind: str) -> None:
    async with tls_channel(address(plane, kind), mesh_root(plane)) as channel:
        assert_refused(kind, await call(kind, channel))


@pytest.mark.parametrize("kind", KINDS)
async def test_certificate_from_a_foreign_ca_is_refused(plane: ControlPlane, kind: str) -> None:
    """Same trust domain, same SPIFFE id as the gateway, but signed by another CA."""
    foreign = CertificateAuthority.generate(trust_domain="cluster.local")
    forged = foreign.issue(proxy_cert(plane).spiffe_id, ttl=timedelta(hours=1))
    async with tls_channel(address(plane, kind), mesh_root(plane), forged) as channel:
        assert_refused(kind, await call(kind, channel))


@pytest.mark.parametrize("kind", KINDS)
async def test_a_proxy_with_its_mesh_certificate_is_served(plane: ControlPlane, kind: str) -> None:
    async with tls_channel(address(plane, kind), mesh_root(plane), proxy_cert(plane)) as channel:
        assert_served(kind, await call(kind, channel))
    assert plane.services.status()[kind]["tls"] == "mesh"


def server_certificate(
    target: str, root: bytes, client: WorkloadCert, tmp: Path
) -> x509.Certificate:
    """The certificate the server presents on a fresh connection (handshake with ALPN h2)."""
    (tmp / "client.crt").write_bytes(client.cert_pem)
    (tmp / "client.key").write_bytes(client.key_pem)
    context = ssl.create_default_context(cadata=root.decode())
    context.load_cert_chain(tmp / "client.crt", tmp / "client.key")
    context.set_alpn_protocols(["h2"])
    host, _, port = target.rpartition(":")
    with (
        socket.create_connection((host, int(port)), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=host) as tls,
    ):
        assert tls.selected_alpn_protocol() == "h2"
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def uri_sans(cert: x509.Certificate) -> list[str]:
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return sans.get_values_for_type(x509.UniformResourceIdentifier)


@pytest.mark.parametrize("kind", KINDS)
async def test_the_service_presents_its_spiffe_id_from_the_mesh_ca(
    plane: ControlPlane, kind: str, tmp_path: Path
) -> None:
    cert = server_certificate(address(plane, kind), mesh_root(plane), proxy_cert(plane), tmp_path)
    assert uri_sans(cert) == [f"spiffe://cluster.local/ns/default/sa/legation-{kind}"]
    assert plane.issuer.ca is not None
    assert cert.issuer == plane.issuer.ca.cert.subject
    assert plane.status()["mtls"]["services"][kind]["serial"] == format(cert.serial_number, "x")


async def test_renewal_serves_the_new_certificate_without_dropping_open_streams(
    plane: ControlPlane, tmp_path: Path
) -> None:
    target = address(plane, "extproc")
    before = server_certificate(target, mesh_root(plane), proxy_cert(plane), tmp_path)
    async with tls_channel(target, mesh_root(plane), proxy_cert(plane)) as channel:
        stream = proc_grpc.ExternalProcessorStub(channel).Process(
            metadata=((CHAIN_METADATA_KEY, "tagged"),), timeout=10
        )
        await stream.write(proc_pb2.ProcessingRequest(request_headers=_headers()))
        assert (await stream.read()).WhichOneof("response") == "request_headers"
        rotated = plane.rotate(force=True)  # proxies and services alike
        assert GATEWAY_NODE in rotated
        # the stream opened before the renewal goes on
        await stream.write(proc_pb2.ProcessingRequest(response_headers=proc_pb2.HttpHeaders()))
        assert (await stream.read()).WhichOneof("response") == "response_headers"
        await stream.done_writing()
        assert await stream.code() == grpc.StatusCode.OK
    after = server_certificate(target, mesh_root(plane), proxy_cert(plane), tmp_path)
    assert after.serial_number != before.serial_number
    assert uri_sans(after) == uri_sans(before)
    # the proxy's renewed certificate is accepted too
    async with tls_channel(target, mesh_root(plane), proxy_cert(plane)) as channel:
        assert_served("extproc", await call("extproc", channel))


@pytest.mark.parametrize(("mode", "tls"), [("off", None), ("strict", "none")])
async def test_plaintext_when_mtls_is_off_or_the_block_opts_out(
    tmp_path: Path, mode: str, tls: str | None
) -> None:
    cp = await start_plane(write_mesh(tmp_path, mode=mode, tls=tls))
    try:
        for kind in KINDS:
            assert cp.services.status()[kind]["tls"] == "none"
            async with grpc.aio.insecure_channel(address(cp, kind)) as channel:
                assert_served(kind, await call(kind, channel))
        assert cp.issuer.service_certs == {}
    finally:
        await cp.stop()


def test_tls_mesh_without_mtls_is_a_mesh_error_naming_the_field(tmp_path: Path) -> None:
    text = write_mesh(tmp_path, mode="off", tls="mesh").read_text()
    with pytest.raises(MeshConfigError) as info:
        parse_mesh(text, source="mesh.yaml")
    assert [(p.path, p.message) for p in info.value.problems] == [
        (
            f"{kind}.tls",
            "'mesh' needs mtls.mode permissive or strict (the certificates come "
            "from the mesh CA); or set tls: none",
        )
        for kind in KINDS
    ]


def test_a_service_cannot_take_a_request_path_services_identity(tmp_path: Path) -> None:
    text = write_mesh(tmp_path, mode="strict").read_text().replace("web", "legation-extauthz")
    with pytest.raises(MeshConfigError) as info:
        parse_mesh(text, source="mesh.yaml")
    assert [(p.path, p.message) for p in info.value.problems] == [
        (
            "services[0].name",
            "'legation-extauthz' is reserved for Legation's request-path "
            "service of that name (its SPIFFE identity with mTLS)",
        )
    ]


async def test_bind_failure_is_one_error_naming_service_and_address() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(BindError) as info:
            await start_grpc_server("extauthz", lambda server: None, host="127.0.0.1", port=port)
    assert str(info.value).startswith(f"extauthz: cannot listen on 127.0.0.1:{port}")
    assert info.value.code == "bind_failed"


def test_server_tls_keeps_the_key_out_of_repr() -> None:
    tls = ServerTls(
        cert_chain_pem=b"CERT", key_pem=b"-----BEGIN PRIVATE KEY-----", client_ca_pem=b"CA"
    )
    assert "PRIVATE" not in repr(tls)


async def test_a_reload_that_turns_mtls_off_restarts_the_services_in_plaintext(
    plane: ControlPlane,
) -> None:
    text = plane.mesh_path.read_text()
    plane.mesh_path.write_text(text.replace("mode: strict", "mode: off"))
    assert await plane.reload() is True
    for kind in KINDS:
        assert plane.services.status()[kind]["tls"] == "none"
        async with grpc.aio.insecure_channel(address(plane, kind)) as channel:
            assert_served(kind, await call(kind, channel))
    plane.mesh_path.write_text(text)  # and back on: plaintext refused again
    assert await plane.reload() is True
    for kind in KINDS:
        async with grpc.aio.insecure_channel(address(plane, kind)) as channel:
            assert_refused(kind, await call(kind, channel))
        async with tls_channel(
            address(plane, kind), mesh_root(plane), proxy_cert(plane)
        ) as channel:
            assert_served(kind, await call(kind, channel))
