"""xDS enrolment, attacked: who can get a proxy's private key out of the control plane.

Every test here stands for a way a client that reaches the xDS port tried to obtain SDS secrets
(the proxies' private keys) on the landed main, where any client got any node's key. Now only the
proxy holding a node's current credential gets that node's secrets, and nothing else does.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from legation.certs import proxy_secrets
from legation.certs.enrol import XDS_NODE_PREFIX, node_dir_name, node_of_uri, node_uri
from legation.xds.cache import SnapshotCache
from legation.xds.server import XdsServer
from legation.xds.snapshot import Snapshot
from legation.xds.types import ResourceType as T
from tests.xds.envoy_resources import services_snapshot
from tests.xds.pki import TestPki

KEY_MARK = b"PRIVATE KEY"
ADS = "/envoy.service.discovery.v3.AggregatedDiscoveryService/"
SDS = "/envoy.service.secret.v3.SecretDiscoveryService/"


def secret_snapshot(pki: TestPki, label: str) -> Snapshot:
    """A proxy's snapshot as the control plane publishes it with mTLS on: its key inside."""
    workload = pki.mesh_ca.issue(
        f"spiffe://test.local/ns/default/sa/{label}", ttl=timedelta(hours=1)
    )
    base = services_snapshot(label, 10000, {"a": 1})
    return Snapshot(
        label,
        clusters=[r.message for r in base.resources(T.CLUSTER).values()],
        endpoints=[r.message for r in base.resources(T.ENDPOINT).values()],
        listeners=[r.message for r in base.resources(T.LISTENER).values()],
        routes=[r.message for r in base.resources(T.ROUTE).values()],
        secrets=proxy_secrets(workload, pki.mesh_ca.root_pem),
    )


class Plane:
    def __init__(self, server: XdsServer, pki: TestPki) -> None:
        self.server = server
        self.pki = pki
        self.cache = server.cache

    def refused(self, reason: str) -> float:
        return float(self.cache.metrics.auth_refused.labels(reason)._value.get())


@pytest.fixture
async def plane(tmp_path: Path) -> AsyncIterator[Plane]:
    pki = TestPki(tmp_path)
    cache = SnapshotCache(debounce=0)
    server = await pki.server(cache, port=0).start()
    cache.set_snapshot("proxy-a", secret_snapshot(pki, "a"))
    cache.set_snapshot("proxy-b", secret_snapshot(pki, "b"))
    cache.set_snapshot("fleet", secret_snapshot(pki, "fleet"))  # a node named like a cluster
    yield Plane(server, pki)
    await server.stop(0)


def request(
    node: str, rtype: T = T.SECRET, *, cluster: str = "", names: tuple[str, ...] = ()
) -> discovery_pb2.DiscoveryRequest:
    return discovery_pb2.DiscoveryRequest(
        node=base_pb2.Node(id=node, cluster=cluster),
        type_url=rtype.type_url,
        resource_names=list(names),
    )


async def fetch_secrets(channel: grpc.aio.Channel, node: str, **kw: Any) -> Any:
    call = channel.unary_unary(
        SDS + "FetchSecrets",
        request_serializer=discovery_pb2.DiscoveryRequest.SerializeToString,
        response_deserializer=None,
    )
    return await call(request(node, **kw), timeout=5)


async def first_responses(
    channel: grpc.aio.Channel, method: str, first: Any, deserialize: Any, *, wait: float = 1.0
) -> list[Any]:
    """Everything a stream answers to ``first`` within ``wait`` s; the RPC error if it fails."""
    call = channel.stream_stream(
        method, request_serializer=type(first).SerializeToString, response_deserializer=deserialize
    )

    async def gen() -> AsyncIterator[Any]:
        yield first
        await asyncio.sleep(wait + 1)

    got: list[Any] = []
    stream = call(gen())
    try:
        async with asyncio.timeout(wait):
            async for response in stream:
                got.append(response)
    except TimeoutError:
        pass
    finally:
        stream.cancel()
    return got


def no_key(payloads: list[Any]) -> bool:
    return all(
        KEY_MARK not in (p if isinstance(p, bytes) else p.SerializeToString()) for p in payloads
    )


# -- no credential ---------------------------------------------------------------------------


async def test_plaintext_client_gets_no_key(plane: Plane) -> None:
    async with grpc.aio.insecure_channel(plane.server.address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await fetch_secrets(channel, "proxy-a", names=("legation-workload-cert",))
    assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAUTHENTICATED)
    assert not plane.cache.status  # nothing recorded about a node nobody proved to be


async def test_tls_client_without_a_certificate_gets_no_key(plane: Plane) -> None:
    creds = grpc.ssl_channel_credentials(root_certificates=plane.pki.ca.root_pem)
    async with grpc.aio.secure_channel(plane.server.address, creds) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await fetch_secrets(channel, "proxy-a")
    assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAUTHENTICATED)


async def test_workload_certificate_is_not_an_xds_credential(plane: Plane) -> None:
    """A certificate from the xDS root that names a workload, not a node, enrols nothing (a real
    workload certificate, from the mesh root, does not even get through the handshake: see
    test_xds_review)."""
    workload = plane.pki.ca.issue("spiffe://test.local/ns/default/sa/a", ttl=timedelta(hours=1))
    async with grpc.aio.secure_channel(
        plane.server.address, plane.pki.channel_credentials(workload)
    ) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await fetch_secrets(channel, "proxy-a")
    assert err.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert plane.refused("not_a_node") == 1


# -- another proxy's identity ------------------------------------------------------------------


async def test_proxy_a_claiming_b_is_denied_on_every_path(
    plane: Plane, caplog: pytest.LogCaptureFixture
) -> None:
    creds = plane.pki.credentials("proxy-a")
    sotw = request("proxy-b", names=("legation-workload-cert",))
    delta = discovery_pb2.DeltaDiscoveryRequest(
        node=base_pb2.Node(id="proxy-b"),
        type_url=T.SECRET.type_url,
        resource_names_subscribe=["legation-workload-cert"],
    )
    async with grpc.aio.secure_channel(plane.server.address, creds) as channel:
        for method, first in (
            (ADS + "StreamAggregatedResources", sotw),
            (ADS + "DeltaAggregatedResources", delta),
            (SDS + "StreamSecrets", sotw),
            (SDS + "DeltaSecrets", delta),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                got = await first_responses(channel, method, first, None)
                raise AssertionError(
                    f"{method}: answered {len(got)} responses, no_key={no_key(got)}"
                )
            assert err.value.code() is grpc.StatusCode.PERMISSION_DENIED, method
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await fetch_secrets(channel, "proxy-b", names=("legation-workload-cert",))
        assert err.value.code() is grpc.StatusCode.PERMISSION_DENIED
        # and its own secrets it does get
        own = await fetch_secrets(channel, "proxy-a", names=("legation-workload-cert",))
        assert KEY_MARK in own
    assert plane.refused("node_mismatch") == 5
    assert "proxy-b" not in plane.cache.status or plane.cache.status["proxy-b"].streams == 0


async def test_a_later_request_naming_another_node_ends_the_stream(plane: Plane) -> None:
    creds = plane.pki.credentials("proxy-a")
    async with grpc.aio.secure_channel(plane.server.address, creds) as channel:
        call = channel.stream_stream(
            ADS + "StreamAggregatedResources",
            request_serializer=discovery_pb2.DiscoveryRequest.SerializeToString,
            response_deserializer=discovery_pb2.DiscoveryResponse.FromString,
        )
        queue: asyncio.Queue[Any] = asyncio.Queue()

        async def gen() -> AsyncIterator[Any]:
            while True:
                yield await queue.get()

        stream = call(gen())
        queue.put_nowait(request("proxy-a", T.CLUSTER))
        first = await asyncio.wait_for(stream.read(), 5)
        assert first.type_url == T.CLUSTER.type_url
        queue.put_nowait(request("proxy-b", names=("legation-workload-cert",)))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            while True:
                got = await asyncio.wait_for(stream.read(), 5)
                assert got is grpc.aio.EOF or KEY_MARK not in got.SerializeToString()
                if got is grpc.aio.EOF:
                    raise AssertionError("stream ended without an error")
        assert err.value.code() is grpc.StatusCode.PERMISSION_DENIED


async def test_claimed_node_id_is_logged_escaped(
    plane: Plane, caplog: pytest.LogCaptureFixture
) -> None:
    evil = "proxy-b\n2026-01-01 INFO forged line\x1b[31m\u202e"
    creds = plane.pki.credentials("proxy-a")
    caplog.set_level(logging.WARNING, "legation.xds")
    async with grpc.aio.secure_channel(plane.server.address, creds) as channel:
        with pytest.raises(grpc.aio.AioRpcError):
            await fetch_secrets(channel, evil)
    lines = [r.getMessage() for r in caplog.records if "node_mismatch" in r.getMessage()]
    assert len(lines) == 1
    assert "\n" not in lines[0] and "\x1b" not in lines[0] and "\u202e" not in lines[0]
    assert "proxy-b\\n2026" in lines[0]


# -- cluster fallback ----------------------------------------------------------------------------


async def test_node_without_a_snapshot_gets_nothing_through_its_cluster(plane: Plane) -> None:
    """An authenticated node gets its own snapshot or nothing: its claimed cluster (here another
    node's id) finds no snapshot, secret or not."""
    creds = plane.pki.credentials("stranger")  # a real credential, but no snapshot of its own
    async with grpc.aio.secure_channel(plane.server.address, creds) as channel:
        got = await fetch_secrets(
            channel,
            "stranger",
            cluster="fleet",
            names=("legation-workload-cert", "legation-trust-bundle"),
        )
        assert KEY_MARK not in got
        assert not discovery_pb2.DiscoveryResponse.FromString(got).resources
        for method, first in (
            (
                ADS + "StreamAggregatedResources",
                request("stranger", cluster="fleet", names=("legation-workload-cert",)),
            ),
            (
                ADS + "DeltaAggregatedResources",
                discovery_pb2.DeltaDiscoveryRequest(
                    node=base_pb2.Node(id="stranger", cluster="fleet"),
                    type_url=T.SECRET.type_url,
                    resource_names_subscribe=["legation-workload-cert"],
                ),
            ),
        ):
            got_stream = await first_responses(channel, method, first, None, wait=0.5)
            assert no_key(got_stream), method
        # nor the other node's listeners and clusters
        for rtype in (T.CLUSTER, T.LISTENER):
            got_config = await first_responses(
                channel,
                ADS + "StreamAggregatedResources",
                request("stranger", rtype, cluster="fleet"),
                discovery_pb2.DiscoveryResponse.FromString,
                wait=0.5,
            )
            assert not any(r.resources for r in got_config), rtype
    # disconnected, it leaves no status behind
    await asyncio.sleep(0.1)
    assert "stranger" not in plane.cache.status


# -- expired, revoked, foreign -------------------------------------------------------------------


async def test_expired_credential_is_refused(plane: Plane) -> None:
    # the CA is a minute old: a 10 s credential issued 50 s ago is over
    past = datetime.now(UTC) - timedelta(seconds=50)
    old = plane.pki.issue("proxy-a", ttl=timedelta(seconds=10), now=past)
    async with grpc.aio.secure_channel(
        plane.server.address, plane.pki.channel_credentials(old)
    ) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await fetch_secrets(channel, "proxy-a")
    assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAUTHENTICATED)


async def test_credential_expired_by_the_servers_clock_is_refused(tmp_path: Path) -> None:
    """The handler checks validity itself too (a TLS stack that skipped the time check, or a
    credential the server's clock says is over)."""
    pki = TestPki(tmp_path)
    auth = pki.auth()
    cache = SnapshotCache(debounce=0)
    server = await XdsServer(cache, auth=auth, port=0).start()
    later = datetime.now(UTC) + timedelta(hours=2)
    auth.clock = lambda: later
    assert auth._serving is not None and auth._serving.not_after > later
    try:
        cache.set_snapshot("proxy-a", secret_snapshot(pki, "a"))
        async with grpc.aio.secure_channel(server.address, pki.credentials("proxy-a")) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await fetch_secrets(ch, "proxy-a")
        assert err.value.code() is grpc.StatusCode.UNAUTHENTICATED
        assert cache.metrics.auth_refused.labels("expired")._value.get() == 1
    finally:
        await server.stop(0)


async def test_superseded_credential_is_refused(plane: Plane) -> None:
    first = plane.pki.issue("proxy-a")
    second = plane.pki.issue("proxy-a")  # re-enrolment revokes the first
    async with grpc.aio.secure_channel(
        plane.server.address, plane.pki.channel_credentials(first)
    ) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await fetch_secrets(channel, "proxy-a")
    assert err.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert plane.refused("superseded") == 1
    async with grpc.aio.secure_channel(
        plane.server.address, plane.pki.channel_credentials(second)
    ) as channel:
        assert KEY_MARK in await fetch_secrets(
            channel, "proxy-a", names=("legation-workload-cert",)
        )


async def test_credential_never_recorded_is_refused(plane: Plane) -> None:
    unrecorded = plane.pki.issue("proxy-a", record=False)
    async with grpc.aio.secure_channel(
        plane.server.address, plane.pki.channel_credentials(unrecorded)
    ) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await fetch_secrets(channel, "proxy-a")
    assert err.value.code() is grpc.StatusCode.UNAUTHENTICATED


async def test_credential_from_a_foreign_ca_is_refused(plane: Plane, tmp_path: Path) -> None:
    foreign = TestPki(tmp_path / "foreign")
    cert = foreign.issue("proxy-a")
    creds = grpc.ssl_channel_credentials(
        root_certificates=plane.pki.ca.root_pem,
        private_key=cert.key_pem,
        certificate_chain=cert.cert_pem,
    )
    async with grpc.aio.secure_channel(plane.server.address, creds) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await fetch_secrets(channel, "proxy-a")
    assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAUTHENTICATED)


async def test_client_refuses_a_server_not_signed_by_the_mesh_ca(
    plane: Plane, tmp_path: Path
) -> None:
    """A proxy only talks to the real control plane: an impostor's certificate fails."""
    impostor_pki = TestPki(tmp_path / "impostor")
    impostor = await impostor_pki.server(SnapshotCache(debounce=0), port=0).start()
    try:
        async with grpc.aio.secure_channel(
            impostor.address, plane.pki.credentials("proxy-a")
        ) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await fetch_secrets(channel, "proxy-a")
        assert err.value.code() is grpc.StatusCode.UNAVAILABLE
    finally:
        await impostor.stop(0)


# -- the facade never runs open by accident ------------------------------------------------------


def test_xds_server_needs_auth_and_the_test_mode_stays_on_loopback() -> None:
    cache = SnapshotCache()
    with pytest.raises(ValueError, match="needs auth="):
        XdsServer(cache)
    with pytest.raises(ValueError, match=r"refusing to serve unauthenticated xDS on '0\.0\.0\.0'"):
        XdsServer(cache, host="0.0.0.0", insecure_unauthenticated_loopback_only=True)
    XdsServer(cache, host="127.0.0.1", insecure_unauthenticated_loopback_only=True)
    XdsServer(cache, host="::1", insecure_unauthenticated_loopback_only=True)


# -- the node id in a certificate ----------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.text(min_size=1, max_size=200))
def test_node_ids_round_trip_through_the_uri_san_and_nothing_else_does(node: str) -> None:
    uri = node_uri(node)
    assert uri.isascii() and uri.startswith(XDS_NODE_PREFIX)
    assert node_of_uri(uri) == node
    assert "/" not in uri[len(XDS_NODE_PREFIX) :]
    name = node_dir_name(node)
    assert "/" not in name and name not in (".", "..", "")


@given(st.text(max_size=80))
def test_foreign_or_non_canonical_uris_name_no_node(tail: str) -> None:
    assert node_of_uri("spiffe://test.local/ns/default/sa/" + tail) is None
    encoded = node_uri("A" + tail)[len(XDS_NODE_PREFIX) :]
    assert node_of_uri(XDS_NODE_PREFIX + "%41" + encoded[1:]) is None  # "A" spelt %41


def test_surrogates_and_oversized_ids_are_refused() -> None:
    from legation.certs import CertError

    for bad in ("", "x" * 2000):
        with pytest.raises(CertError):
            node_uri(bad)
    assert node_of_uri(XDS_NODE_PREFIX + "%FF") is None  # not UTF-8
    assert node_dir_name("..") == "%2E%2E" and node_dir_name(".") == "%2E"


# -- a real Envoy, enrolled with `legation bootstrap` ---------------------------------------------


@pytest.mark.integration
def test_envoy_with_legation_bootstrap_output_connects_acks_serves_and_survives_rotation(
    tmp_path: Path,
) -> None:
    import subprocess
    import sys
    import time

    from legation.demo import DemoApp
    from legation.embedded import BackgroundControlPlane
    from legation.envoy_process import EnvoyProcess
    from tests.conftest import free_port
    from tests.integration.test_xds_envoy import converge, get, mesh

    node, admin, listen = "edge proxy/1", free_port(), free_port()  # an id that needs encoding
    app = DemoApp("app", version="v1").start_in_thread()
    cp = BackgroundControlPlane(ca_dir=tmp_path / "ca", debounce=0.01).start()
    envoy: EnvoyProcess | None = None

    def legation_bootstrap(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "legation.cli",
                "bootstrap",
                "--node",
                node,
                "--xds",
                f"127.0.0.1:{cp.port}",
                "--admin-port",
                str(admin),
                "--ca-dir",
                str(tmp_path / "ca"),
                *extra,
            ],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,
        )

    try:
        cp.set_snapshot(node, mesh("v1", listen, 1, {"app": app.port}))
        done = legation_bootstrap()
        assert done.returncode == 0, done.stderr
        assert "PRIVATE" not in done.stdout + done.stderr
        creds = tmp_path / "nodes" / node_dir_name(node)  # next to the CA
        assert (creds / "xds-client.yaml").stat().st_mode & 0o777 == 0o600
        assert creds.stat().st_mode & 0o777 == 0o700
        envoy = EnvoyProcess(
            done.stdout, admin_port=admin, name="enrolled", log_dir=tmp_path / "logs"
        ).start()
        envoy.wait_live()
        converge(lambda: get(listen, "/app")[0] == 200)
        st = cp.status(node)
        assert st is not None and st["connected"] and st["nacks"] == 0
        assert set(st["acked"]) == {"CDS", "EDS", "LDS", "RDS"}

        # re-enrol: the old credential is revoked, the running Envoy picks the new one up from
        # the watched directory and reconnects with it after a control-plane restart
        old = (creds / "xds-client.yaml").read_bytes()
        rotated = legation_bootstrap("--rotate")
        assert rotated.returncode == 0, rotated.stderr
        assert (creds / "xds-client.yaml").read_bytes() != old
        time.sleep(1.0)  # Envoy reloads the watched secret
        cp.stop_server()
        cp.start()
        cp.set_snapshot(node, mesh("v2", listen, 1, {"app": app.port}))
        deadline = time.monotonic() + 20
        while True:
            st = cp.status(node)
            if st is not None and st["connected"] and len(st["acked"]) == 4:
                break
            assert time.monotonic() < deadline, envoy.log_tail()
            time.sleep(0.1)
        assert cp.refused("superseded") == 0  # it did not come back with the revoked one
        assert get(listen, "/app")[0] == 200
    finally:
        if envoy is not None:
            envoy.stop()
        cp.close()
        app.stop_thread()


async def _open_secret_stream(
    channel: grpc.aio.Channel, node: str
) -> tuple[Any, asyncio.Queue[Any]]:
    """An SDS stream for ``node`` kept open; its responses (or its error) go to the queue."""
    call = channel.stream_stream(
        SDS + "StreamSecrets",
        request_serializer=discovery_pb2.DiscoveryRequest.SerializeToString,
        response_deserializer=None,
    )
    done = asyncio.Event()

    async def requests() -> AsyncIterator[Any]:
        yield request(node, names=("legation-workload-cert",))
        await done.wait()

    stream = call(requests())
    got: asyncio.Queue[Any] = asyncio.Queue()

    async def pump() -> None:
        try:
            async for response in stream:
                await got.put(response)
        except grpc.aio.AioRpcError as err:
            await got.put(err)
        finally:
            done.set()

    asyncio.get_running_loop().create_task(pump())
    return stream, got


async def test_a_credential_revoked_while_its_stream_is_open_gets_no_new_key(
    plane: Plane,
) -> None:
    """Re-enrolment revokes the old credential: its open stream is cut at the next push,
    before the push, and the new snapshot's key never reaches it."""
    first = plane.pki.issue("proxy-a")
    async with grpc.aio.secure_channel(
        plane.server.address, plane.pki.channel_credentials(first)
    ) as channel:
        stream, got = await _open_secret_stream(channel, "proxy-a")
        assert KEY_MARK in await asyncio.wait_for(got.get(), 5)
        plane.pki.issue("proxy-a")  # re-enrolled elsewhere: the first credential is revoked
        plane.cache.set_snapshot("proxy-a", secret_snapshot(plane.pki, "a-rotated"))
        answer = await asyncio.wait_for(got.get(), 5)
        stream.cancel()
    assert isinstance(answer, grpc.aio.AioRpcError), "the revoked stream got the new snapshot"
    assert answer.code() is grpc.StatusCode.UNAUTHENTICATED
    assert plane.refused("superseded") == 1


async def test_a_revoked_idle_stream_is_cut_without_waiting_for_a_push(
    plane: Plane, monkeypatch: pytest.MonkeyPatch
) -> None:
    from legation.xds._stream import StreamBase

    monkeypatch.setattr(StreamBase, "recheck_every", 0.2)
    first = plane.pki.issue("proxy-a")
    async with grpc.aio.secure_channel(
        plane.server.address, plane.pki.channel_credentials(first)
    ) as channel:
        stream, got = await _open_secret_stream(channel, "proxy-a")
        assert KEY_MARK in await asyncio.wait_for(got.get(), 5)
        plane.pki.issue("proxy-a")
        answer = await asyncio.wait_for(got.get(), 5)
        stream.cancel()
    assert isinstance(answer, grpc.aio.AioRpcError)
    assert answer.code() is grpc.StatusCode.UNAUTHENTICATED
