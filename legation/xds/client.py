"""A small ADS client that behaves as Envoy does, for tests, benchmarks and debugging.

It subscribes to all clusters and listeners, follows them with EDS subscriptions for EDS clusters
and RDS subscriptions for the route configurations the listeners name, and ACKs every response, or
NACKs it when ``reject`` says so. It keeps what it accepted, what it was sent and how many bytes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.rpc import status_pb2

from legation.xds.snapshot import Snapshot
from legation.xds.types import ResourceType

Reject = Callable[[ResourceType, dict[str, Any]], str | None]

_ADS = "/envoy.service.discovery.v3.AggregatedDiscoveryService/"


@dataclass
class Received:
    type: ResourceType
    version: str
    nonce: str
    names: list[str]
    removed: list[str]
    nbytes: int
    at: float


@dataclass
class _Sub:
    names: set[str] = field(default_factory=set)
    version: str = ""
    nonce: str = ""
    resources: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)  # delta per-resource versions


class AdsClient:
    def __init__(
        self,
        target: str,
        node_id: str,
        *,
        cluster: str = "",
        delta: bool = False,
        reject: Reject | None = None,
        initial: dict[ResourceType, dict[str, str]] | None = None,
        initial_versions: dict[ResourceType, str] | None = None,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        """``credentials``: the node's enrolment credential (see
        :func:`legation.xds.auth.channel_credentials`); None only against a server in its
        insecure test mode."""
        self.target = target
        self.credentials = credentials
        self.node = base_pb2.Node(id=node_id, cluster=cluster or node_id)
        self.delta = delta
        self.reject = reject
        self.subs: dict[ResourceType, _Sub] = {}
        self.acked: dict[ResourceType, str] = {}
        self.nacked: dict[ResourceType, str] = {}
        self.received: list[Received] = []
        self.bytes_received = 0
        self.changed = asyncio.Condition()
        self._initial = initial or {}
        self._initial_versions = initial_versions or {}
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._channel: grpc.aio.Channel | None = None
        self._task: asyncio.Task[None] | None = None
        self._first = True

    async def start(self) -> AdsClient:
        options = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]
        if self.credentials is not None:
            self._channel = grpc.aio.secure_channel(self.target, self.credentials, options)
        else:
            self._channel = grpc.aio.insecure_channel(self.target, options)
        if self.delta:
            call = self._channel.stream_stream(
                _ADS + "DeltaAggregatedResources",
                request_serializer=discovery_pb2.DeltaDiscoveryRequest.SerializeToString,
                response_deserializer=discovery_pb2.DeltaDiscoveryResponse.FromString,
            )
        else:
            call = self._channel.stream_stream(
                _ADS + "StreamAggregatedResources",
                request_serializer=discovery_pb2.DiscoveryRequest.SerializeToString,
                response_deserializer=discovery_pb2.DiscoveryResponse.FromString,
            )
        self._call = call(self._requests())
        for rtype in (ResourceType.CLUSTER, ResourceType.LISTENER):
            self.subs[rtype] = _Sub()
            self._subscribe(rtype, set(), initial=True)
        # On reconnect Envoy re-subscribes to the named resources it already has.
        for rtype in (ResourceType.ENDPOINT, ResourceType.ROUTE):
            if self._initial.get(rtype):
                self.subs[rtype] = _Sub()
                self._subscribe(rtype, set(self._initial[rtype]), initial=True)
        self._task = asyncio.create_task(self._receive())
        return self

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self._channel is not None:
            await self._channel.close()

    async def _requests(self) -> Any:
        while True:
            item = await self._queue.get()
            if item is None:
                return
            yield item

    def _send(self, **fields: Any) -> None:
        if self._first:
            fields["node"] = self.node
            self._first = False
        cls = discovery_pb2.DeltaDiscoveryRequest if self.delta else discovery_pb2.DiscoveryRequest
        self._queue.put_nowait(cls(**fields))

    def _subscribe(self, rtype: ResourceType, names: set[str], *, initial: bool = False) -> None:
        sub = self.subs[rtype]
        if self.delta:
            added, gone = names - sub.names, sub.names - names
            if not (initial or added or gone):
                return
            kw: dict[str, Any] = {
                "type_url": rtype.type_url,
                "resource_names_subscribe": sorted(added),
                "resource_names_unsubscribe": sorted(gone),
            }
            if initial and rtype in self._initial:
                kw["initial_resource_versions"] = self._initial[rtype]
                sub.versions = dict(self._initial[rtype])
            sub.names = set(names)
            self._send(**kw)
        else:
            if not initial and names == sub.names:
                return
            sub.names = set(names)
            if initial and rtype in self._initial_versions:
                sub.version = self._initial_versions[rtype]
            self._send(
                type_url=rtype.type_url,
                resource_names=sorted(names),
                version_info=sub.version,
                response_nonce=sub.nonce,
            )

    async def _receive(self) -> None:
        async for resp in self._call:
            rtype = ResourceType.from_url(resp.type_url)
            sub = self.subs.setdefault(rtype, _Sub())
            size = resp.ByteSize()
            self.bytes_received += size
            if self.delta:
                decoded = {
                    r.name: rtype.message_class.FromString(r.resource.value) for r in resp.resources
                }
                names, removed = list(decoded), list(resp.removed_resources)
                version = resp.system_version_info
            else:
                decoded = {}
                for any_msg in resp.resources:
                    msg = rtype.message_class.FromString(any_msg.value)
                    decoded[rtype.name_of(msg)] = msg
                names, removed = list(decoded), []
                version = resp.version_info
            self.received.append(
                Received(rtype, version, resp.nonce, names, removed, size, time.monotonic())
            )
            problem = self.reject(rtype, decoded) if self.reject else None
            if problem is None:
                if self.delta:
                    sub.resources.update(decoded)
                    for r in resp.resources:
                        sub.versions[r.name] = r.version
                    for name in removed:
                        sub.resources.pop(name, None)
                        sub.versions.pop(name, None)
                else:
                    sub.resources = decoded
                    sub.version = version
                self.acked[rtype] = version
                self._follow(rtype)
            else:
                self.nacked[rtype] = version
            sub.nonce = resp.nonce
            error = status_pb2.Status(code=3, message=problem) if problem else None
            if self.delta:
                kw: dict[str, Any] = {"type_url": resp.type_url, "response_nonce": resp.nonce}
                if error is not None:
                    kw["error_detail"] = error
                self._send(**kw)
            else:
                kw = {
                    "type_url": resp.type_url,
                    "response_nonce": resp.nonce,
                    "version_info": sub.version,
                    "resource_names": sorted(sub.names),
                }
                if error is not None:
                    kw["error_detail"] = error
                self._send(**kw)
            async with self.changed:
                self.changed.notify_all()

    def _follow(self, rtype: ResourceType) -> None:
        """Subscribe to what the accepted clusters and listeners reference, as Envoy does."""
        if rtype is ResourceType.CLUSTER:
            snap = Snapshot(clusters=self.subs[rtype].resources.values())
            self.subs.setdefault(ResourceType.ENDPOINT, _Sub())
            self._subscribe(ResourceType.ENDPOINT, snap.eds_names(), initial=False)
        elif rtype is ResourceType.LISTENER:
            snap = Snapshot(listeners=self.subs[rtype].resources.values())
            self.subs.setdefault(ResourceType.ROUTE, _Sub())
            self._subscribe(ResourceType.ROUTE, snap.rds_names(), initial=False)

    def resources(self, rtype: ResourceType) -> dict[str, Any]:
        sub = self.subs.get(rtype)
        return dict(sub.resources) if sub else {}

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        async with self.changed:
            await asyncio.wait_for(self.changed.wait_for(predicate), timeout)

    def has_versions(self, snap: Snapshot) -> bool:
        """Every type this client subscribes to was accepted at ``snap``'s version."""
        return all(
            self.acked.get(t) == snap.version(t)
            for t in (
                ResourceType.CLUSTER,
                ResourceType.ENDPOINT,
                ResourceType.LISTENER,
                ResourceType.ROUTE,
            )
            if snap.resources(t)
        )
