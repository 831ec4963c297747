"""The ADS protocol, driven over real gRPC by a client that behaves as Envoy does."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2

from legation.xds.cache import SnapshotCache
from legation.xds.client import AdsClient
from legation.xds.server import XdsServer
from legation.xds.snapshot import InconsistentSnapshot, Snapshot
from legation.xds.types import ResourceType as T
from tests.xds.conftest import XdsUnderTest
from tests.xds.envoy_resources import cluster, endpoints, listener, routes, services_snapshot

MODES = [pytest.param(False, id="sotw"), pytest.param(True, id="delta")]


def first_seen_order(client: AdsClient) -> list[str]:
    order: list[str] = []
    for r in client.received:
        if r.type.short not in order:
            order.append(r.type.short)
    return order


async def until(predicate: object, timeout: float = 5.0) -> None:
    """Poll a server-side condition (the client may see its own ACK before the server does)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():  # type: ignore[operator]
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


async def settle(seconds: float = 0.15) -> None:
    """Give the server a chance to send anything more (used to prove nothing else comes)."""
    await asyncio.sleep(seconds)


@pytest.mark.parametrize("delta", MODES)
async def test_initial_config_arrives_in_send_order(xds: XdsUnderTest, delta: bool) -> None:
    snap = services_snapshot("v1", 10000, {"a": 1, "b": 2})
    xds.cache.set_snapshot("n1", snap)
    client = await xds.client("n1", delta=delta).start()
    try:
        await client.wait_for(lambda: client.has_versions(snap))
        assert first_seen_order(client) == ["CDS", "EDS", "LDS", "RDS"]
        assert set(client.resources(T.CLUSTER)) == {"a", "b"}
        assert set(client.resources(T.ENDPOINT)) == {"a", "b"}
        assert set(client.resources(T.ROUTE)) == {"ingress-routes"}
        status = xds.cache.status["n1"]
        assert status.streams == 1
        await until(lambda: len(status.acked) == 4)
        assert status.acked == {
            t.short: snap.version(t) for t in (T.CLUSTER, T.ENDPOINT, T.LISTENER, T.ROUTE)
        }
    finally:
        await client.stop()


@pytest.mark.parametrize("delta", MODES)
async def test_fleet_snapshot_serves_proxies_by_cluster_without_auth(delta: bool) -> None:
    """Fleets are for a server that does not authenticate nodes (a library user's)."""
    cache = SnapshotCache(debounce=0.01)
    server = await XdsServer(cache, port=0, insecure_unauthenticated_loopback_only=True).start()
    snap = services_snapshot("v1", 10000, {"a": 1})
    cache.set_fleet_snapshot("gateways", snap)
    clients = [
        await AdsClient(server.address, f"gw-{i}", cluster="gateways", delta=delta).start()
        for i in range(3)
    ]
    try:
        for c in clients:
            await c.wait_for(lambda c=c: c.has_versions(snap))
    finally:
        for c in clients:
            await c.stop()
        await server.stop(0)


def test_node_ids_and_fleets_are_separate_namespaces() -> None:
    cache = SnapshotCache(debounce=0)
    node, fleet = services_snapshot("node", 10000, {"a": 1}), services_snapshot("f", 10000, {})
    cache.set_snapshot("gateways", node)
    assert cache.snapshot_for("gw-1", "gateways") is None  # a node id is no fleet
    cache.set_fleet_snapshot("gateways", fleet)
    assert cache.snapshot_for("gw-1", "gateways") is not None
    assert cache.snapshot_for("gw-1", "gateways").label == "f"  # type: ignore[union-attr]
    assert cache.snapshot("gateways") is node
    cache.clear_fleet_snapshot("gateways")
    assert cache.snapshot_for("gw-1", "gateways") is None
    assert cache.snapshot("gateways") is node


@pytest.mark.parametrize("delta", MODES)
async def test_authenticating_server_serves_no_fleet(xds: XdsUnderTest, delta: bool) -> None:
    xds.cache.set_fleet_snapshot("gateways", services_snapshot("v1", 10000, {"a": 1}))
    client = await xds.client("gw-0", cluster="gateways", delta=delta).start()
    try:
        await settle(0.3)
        assert not client.received
    finally:
        await client.stop()


@pytest.mark.parametrize("delta", MODES)
async def test_endpoint_change_pushes_only_endpoints(xds: XdsUnderTest, delta: bool) -> None:
    v1 = services_snapshot("v1", 10000, {"a": 1, "b": 2})
    xds.cache.set_snapshot("n1", v1)
    client = await xds.client("n1", delta=delta).start()
    try:
        await client.wait_for(lambda: client.has_versions(v1))
        before = len(client.received)
        v2 = services_snapshot("v2", 10000, {"a": 1, "b": 3})
        xds.cache.set_snapshot("n1", v2)
        await client.wait_for(lambda: client.acked.get(T.ENDPOINT) == v2.version(T.ENDPOINT))
        await settle()
        new = client.received[before:]
        assert [r.type.short for r in new] == ["EDS"]
        if delta:
            assert new[0].names == ["b"]  # only the endpoint set that changed
        else:
            assert sorted(new[0].names) == ["a", "b"]  # state of the world: all subscribed
        port = client.resources(T.ENDPOINT)["b"].endpoints[0].lb_endpoints[0]
        assert port.endpoint.address.socket_address.port_value == 3
    finally:
        await client.stop()


@pytest.mark.parametrize("delta", MODES)
async def test_nack_is_recorded_and_not_resent(xds: XdsUnderTest, delta: bool) -> None:
    def reject(rtype: T, resources: dict[str, object]) -> str | None:
        if rtype is T.CLUSTER and "bad" in resources:
            return "cluster bad: invalid"
        return None

    good = services_snapshot("v1", 10000, {"a": 1})
    xds.cache.set_snapshot("n1", good)
    client = await xds.client("n1", delta=delta, reject=reject).start()
    try:
        await client.wait_for(lambda: client.has_versions(good))
        bad = services_snapshot("v2", 10000, {"a": 1, "bad": 2})
        xds.cache.set_snapshot("n1", bad)
        await client.wait_for(lambda: T.CLUSTER in client.nacked)
        # Poke the stream with an unrelated change: the rejected clusters must not come back.
        bad_eds = services_snapshot("v3", 10000, {"a": 5, "bad": 2})
        xds.cache.set_snapshot("n1", bad_eds)
        await client.wait_for(lambda: client.acked.get(T.ENDPOINT) == bad_eds.version(T.ENDPOINT))
        await settle(0.3)
        await until(lambda: xds.cache.status["n1"].acked.get("EDS") == bad_eds.version(T.ENDPOINT))
        cds = [r for r in client.received if r.type is T.CLUSTER]
        assert len(cds) == 2  # the good one, the rejected one; no resend loop
        status = xds.cache.status["n1"]
        assert status.nacks == 1
        assert status.last_nack is not None
        assert status.last_nack.type == "CDS"
        assert status.last_nack.version == bad.version(T.CLUSTER)
        assert status.last_nack.message == "cluster bad: invalid"
        assert status.acked["CDS"] == good.version(T.CLUSTER)  # the last accepted stays current
        assert xds.cache.metrics.nacks.labels("CDS")._value.get() == 1
        # A config change does reach the proxy again.
        fixed = services_snapshot("v4", 10000, {"a": 5, "c": 2})
        xds.cache.set_snapshot("n1", fixed)
        await client.wait_for(lambda: client.has_versions(fixed))
        assert set(client.resources(T.CLUSTER)) == {"a", "c"}
    finally:
        await client.stop()


@pytest.mark.parametrize("delta", MODES)
async def test_make_before_break_on_cluster_swap(xds: XdsUnderTest, delta: bool) -> None:
    v1 = services_snapshot("v1", 10000, {"old": 1})
    xds.cache.set_snapshot("n1", v1)
    client = await xds.client("n1", delta=delta).start()
    try:
        await client.wait_for(lambda: client.has_versions(v1))
        before = len(client.received)
        v2 = services_snapshot("v2", 10000, {"new": 2})
        xds.cache.set_snapshot("n1", v2)
        await client.wait_for(lambda: client.has_versions(v2))
        await client.wait_for(lambda: set(client.resources(T.CLUSTER)) == {"new"})
        new = client.received[before:]
        kinds = [r.type.short for r in new]
        # the new cluster and its endpoints come first, the routes move, then the old cluster goes
        route_at = kinds.index("RDS")
        assert kinds.index("CDS") < kinds.index("EDS") < route_at
        first_cds = new[kinds.index("CDS")]
        assert "new" in first_cds.names
        if delta:
            removal = next(i for i, r in enumerate(new) if r.type is T.CLUSTER and r.removed)
            assert new[removal].removed == ["old"]
        else:
            assert "old" in first_cds.names  # kept while routes still point at it
            removal = max(i for i, r in enumerate(new) if r.type is T.CLUSTER)
            assert new[removal].names == ["new"]
        assert removal > route_at
    finally:
        await client.stop()


@pytest.mark.parametrize("delta", MODES)
async def test_debounce_coalesces_a_burst(xds: XdsUnderTest, delta: bool) -> None:
    xds.cache.debounce = 0.1
    first = services_snapshot("v0", 10000, {"a": 1})
    xds.cache.set_snapshot("n1", first)
    client = await xds.client("n1", delta=delta).start()
    try:
        await client.wait_for(lambda: client.has_versions(first))
        published = xds.cache.publications
        before = len(client.received)
        for i in range(1, 6):
            xds.cache.set_snapshot("n1", services_snapshot(f"v{i}", 10000, {"a": 100 + i}))
            await asyncio.sleep(0.01)
        last = services_snapshot("v5", 10000, {"a": 105})
        await client.wait_for(lambda: client.has_versions(last))
        await settle(0.2)
        assert xds.cache.publications == published + 1
        assert [r.type.short for r in client.received[before:]] == ["EDS"]
    finally:
        await client.stop()


async def test_debounce_is_capped_under_a_steady_stream_of_changes(xds: XdsUnderTest) -> None:
    xds.cache.debounce = 0.1
    xds.cache.max_delay = 0.2
    for i in range(12):  # a change every 40 ms never leaves 100 ms of quiet
        xds.cache.set_snapshot("n1", services_snapshot(f"v{i}", 10000, {"a": i + 1}))
        await asyncio.sleep(0.04)
    assert xds.cache.publications >= 2


def test_inconsistent_snapshot_is_refused_and_replaces_nothing() -> None:
    from legation.xds.cache import SnapshotCache

    cache = SnapshotCache(debounce=0)
    good = services_snapshot("v1", 10000, {"a": 1})
    cache.set_snapshot("n1", good)
    with pytest.raises(InconsistentSnapshot):
        cache.set_snapshot("n1", Snapshot("v2", clusters=[cluster("x")]))
    assert cache.snapshot("n1") is good


async def test_delta_reconnect_with_initial_versions_sends_only_what_changed(
    xds: XdsUnderTest,
) -> None:
    v1 = services_snapshot("v1", 10000, {"a": 1, "b": 2})
    xds.cache.set_snapshot("n1", v1)
    first = await xds.client("n1", delta=True).start()
    await first.wait_for(lambda: first.has_versions(v1))
    known = {t: dict(first.subs[t].versions) for t in first.subs}
    await first.stop()
    v2 = services_snapshot("v2", 10000, {"a": 1, "b": 3})
    xds.cache.set_snapshot("n1", v2)
    await asyncio.sleep(0.05)
    again = await xds.client("n1", delta=True, initial=known).start()
    try:
        await client_settles(again, T.ENDPOINT)
        sent = [(r.type.short, r.names) for r in again.received]
        assert sent == [("EDS", ["b"])]
    finally:
        await again.stop()


async def client_settles(client: AdsClient, rtype: T) -> None:
    await client.wait_for(lambda: rtype in client.acked)
    await settle(0.3)


async def test_sotw_reconnect_at_current_version_is_not_resent(xds: XdsUnderTest) -> None:
    v1 = services_snapshot("v1", 10000, {"a": 1})
    xds.cache.set_snapshot("n1", v1)
    versions = {t: v1.version(t) for t in (T.CLUSTER, T.LISTENER)}
    client = await xds.client("n1", initial_versions=versions).start()
    try:
        # CDS and LDS are current: nothing for them; EDS and RDS are asked for by name afresh.
        await settle(0.4)
        assert T.CLUSTER not in {r.type for r in client.received}
        assert xds.cache.status["n1"].acked["CDS"] == v1.version(T.CLUSTER)
    finally:
        await client.stop()


class RawStream:
    """A hand-driven ADS stream (SotW, or delta with ``delta=True``) for protocol corner cases."""

    def __init__(self, xds: XdsUnderTest, *, node: str = "n1", delta: bool = False) -> None:
        self.channel = grpc.aio.secure_channel(xds.address, xds.credentials(node))
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.request_type: Any = (
            discovery_pb2.DeltaDiscoveryRequest if delta else discovery_pb2.DiscoveryRequest
        )
        response_type = (
            discovery_pb2.DeltaDiscoveryResponse if delta else discovery_pb2.DiscoveryResponse
        )
        method = "DeltaAggregatedResources" if delta else "StreamAggregatedResources"

        async def gen():  # type: ignore[no-untyped-def]
            while True:
                yield await self.queue.get()

        self.call = self.channel.stream_stream(
            f"/envoy.service.discovery.v3.AggregatedDiscoveryService/{method}",
            request_serializer=self.request_type.SerializeToString,
            response_deserializer=response_type.FromString,
        )(gen())
        self.responses: asyncio.Queue[object] = asyncio.Queue()
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for response in self.call:
                self.responses.put_nowait(response)
        except grpc.aio.AioRpcError as err:
            self.responses.put_nowait(err)

    def send(self, **kw: object) -> None:
        self.queue.put_nowait(self.request_type(**kw))

    async def recv(self, timeout: float = 3.0) -> Any:
        got = await asyncio.wait_for(self.responses.get(), timeout)
        if isinstance(got, Exception):
            raise got
        return got

    async def nothing(self, timeout: float = 0.3) -> bool:
        await asyncio.sleep(timeout)
        return self.responses.empty()

    async def close(self) -> None:
        self.reader.cancel()
        self.call.cancel()
        await self.channel.close()


async def test_stale_nonce_is_ignored_and_resubscribe_resends(xds: XdsUnderTest) -> None:
    snap = Snapshot("v1", endpoints=[endpoints("a", 1), endpoints("b", 2)])
    xds.cache.set_snapshot("n1", snap)
    s = RawStream(xds)
    url = T.ENDPOINT.type_url
    try:
        s.send(node=base_pb2.Node(id="n1"), type_url=url, resource_names=["a"])
        r1 = await s.recv()
        assert [a.type_url for a in r1.resources] == [url]
        # ACK, then a request with a nonce the server never sent: ignored (no response).
        s.send(
            type_url=url,
            resource_names=["a"],
            version_info=r1.version_info,
            response_nonce=r1.nonce,
        )
        s.send(type_url=url, resource_names=["a", "b"], response_nonce="bogus")
        assert await s.nothing()
        # unsubscribe from a: an empty response; resubscribe: a comes back
        s.send(
            type_url=url, resource_names=[], version_info=r1.version_info, response_nonce=r1.nonce
        )
        r2 = await s.recv()
        assert len(r2.resources) == 0
        s.send(
            type_url=url,
            resource_names=["a"],
            version_info=r2.version_info,
            response_nonce=r2.nonce,
        )
        r3 = await s.recv()
        assert len(r3.resources) == 1
    finally:
        await s.close()


async def test_first_request_without_node_is_refused(xds: XdsUnderTest) -> None:
    s = RawStream(xds)
    try:
        s.send(type_url=T.CLUSTER.type_url)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await s.recv()
        assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "node.id" in (err.value.details() or "")
    finally:
        await s.close()


@pytest.mark.parametrize("rtype", [T.CLUSTER, T.ENDPOINT, T.LISTENER, T.ROUTE])
async def test_per_type_services_stream_and_fetch(xds: XdsUnderTest, rtype: T) -> None:
    snap = services_snapshot("v1", 10000, {"a": 1})
    xds.cache.set_snapshot("n1", snap)
    xds.cache.flush()
    service = {
        T.CLUSTER: ("cluster", "Clusters"),
        T.ENDPOINT: ("endpoint", "Endpoints"),
        T.LISTENER: ("listener", "Listeners"),
        T.ROUTE: ("route", "Routes"),
    }[rtype]
    prefix = f"/envoy.service.{service[0]}.v3.{service[0].capitalize()}DiscoveryService/"
    names = [] if rtype.wildcard_by_default else list(snap.resources(rtype))
    async with grpc.aio.secure_channel(xds.address, xds.credentials("n1")) as channel:
        fetch = channel.unary_unary(
            prefix + "Fetch" + service[1],
            request_serializer=discovery_pb2.DiscoveryRequest.SerializeToString,
            response_deserializer=discovery_pb2.DiscoveryResponse.FromString,
        )
        got = await fetch(
            discovery_pb2.DiscoveryRequest(node=base_pb2.Node(id="n1"), resource_names=names)
        )
        assert got.version_info == snap.version(rtype)
        assert len(got.resources) == len(snap.resources(rtype))

        stream = channel.stream_stream(
            prefix + "Stream" + service[1],
            request_serializer=discovery_pb2.DiscoveryRequest.SerializeToString,
            response_deserializer=discovery_pb2.DiscoveryResponse.FromString,
        )
        call = stream(
            iter(
                [
                    discovery_pb2.DiscoveryRequest(
                        node=base_pb2.Node(id="n1"), type_url=rtype.type_url, resource_names=names
                    )
                ]
            )
        )
        first = await asyncio.wait_for(call.read(), 3)
        assert first.type_url == rtype.type_url
        assert first.version_info == snap.version(rtype)
        call.cancel()


async def test_resources_are_sent_as_encoded_once(xds: XdsUnderTest) -> None:
    snap = Snapshot(
        "v1",
        clusters=[cluster("a")],
        endpoints=[endpoints("a", 7)],
        listeners=[listener("l", 10000, "r")],
        routes=[routes("r", {"/": "a"})],
    )
    xds.cache.set_snapshot("n1", snap)
    clients = [await xds.client("n1").start() for _ in range(3)]
    try:
        for c in clients:
            await c.wait_for(lambda c=c: c.has_versions(snap))
            got = c.resources(T.CLUSTER)["a"].SerializeToString(deterministic=True)
            assert got == snap.resources(T.CLUSTER)["a"].data
        assert xds.cache.metrics.pushes.labels("CDS")._value.get() == 3
    finally:
        for c in clients:
            await c.stop()


async def test_delta_named_secrets_unsubscribe_and_resubscribe(xds: XdsUnderTest) -> None:
    from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2

    def secret(name: str, key: bytes) -> secret_pb2.Secret:
        return secret_pb2.Secret(
            name=name,
            tls_certificate=common_pb2.TlsCertificate(
                private_key=base_pb2.DataSource(inline_bytes=key)
            ),
        )

    snap = Snapshot("v1", secrets=[secret("a", b"k1"), secret("b", b"k2")])
    xds.cache.set_snapshot("n1", snap)
    url = T.SECRET.type_url
    s = RawStream(xds, delta=True)
    try:
        s.send(node=base_pb2.Node(id="n1"), type_url=url, resource_names_subscribe=["a"])
        r1 = await s.recv()
        assert [r.name for r in r1.resources] == ["a"]  # only what was asked for, by name
        s.send(type_url=url, response_nonce=r1.nonce)
        assert await s.nothing()
        s.send(type_url=url, resource_names_unsubscribe=["a"])
        assert await s.nothing()  # unsubscribing needs no answer
        s.send(type_url=url, resource_names_subscribe=["a", "b"])
        r2 = await s.recv()
        assert sorted(r.name for r in r2.resources) == ["a", "b"]  # a is resent after resubscribe
        s.send(type_url=url, response_nonce=r2.nonce)
        # a change to one secret sends that one only; a removal is named
        xds.cache.set_snapshot("n1", Snapshot("v2", secrets=[secret("a", b"k3")]))
        r3 = await s.recv()
        assert [r.name for r in r3.resources] == ["a"]
        assert list(r3.removed_resources) == ["b"]
    finally:
        await s.close()


async def test_sotw_secrets_by_name(xds: XdsUnderTest) -> None:
    from envoy.extensions.transport_sockets.tls.v3 import secret_pb2

    snap = Snapshot("v1", secrets=[secret_pb2.Secret(name="x"), secret_pb2.Secret(name="y")])
    xds.cache.set_snapshot("n1", snap)
    s = RawStream(xds)
    try:
        s.send(node=base_pb2.Node(id="n1"), type_url=T.SECRET.type_url, resource_names=["y"])
        r = await s.recv()
        assert r.version_info == snap.version(T.SECRET)
        got = [secret_pb2.Secret.FromString(a.value).name for a in r.resources]
        assert got == ["y"]
    finally:
        await s.close()
