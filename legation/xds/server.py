"""The xDS gRPC server: a thin facade that hands every stream to one handler.

Serves ``AggregatedDiscoveryService`` (state of the world and delta) and the per-type CDS, EDS, LDS,
RDS and SDS services (streaming, delta and fetch) for clients that do not use ADS. Responses are
assembled from bytes each resource encoded once (see snapshot.py), so the response serialiser is the
identity.

Every call is authenticated by the :class:`~legation.xds.auth.Authenticator` the server is given
(the control plane's is :class:`legation.certs.xds_auth.XdsAuth`): TLS with a client certificate
that names one node, and every request's node id must be that node's. The one exception is
``insecure_unauthenticated_loopback_only=True``, for protocol tests and benchmarks: it serves
plaintext to anyone who claims any node id, is refused on any host but a loopback address, and
is never what the control plane uses. An authenticated node gets its own snapshot or nothing:
fleet snapshots (by node cluster, :meth:`~legation.xds.cache.SnapshotCache.set_fleet_snapshot`)
are served only in that test mode, since a cluster is the client's claim.

A connection must finish its TLS handshake within ``handshake_timeout`` seconds (default 10), so
idle or stalled unauthenticated connections do not hold the server's descriptors.
"""

from __future__ import annotations

import ipaddress
import logging
from typing import Any

import grpc
from envoy.service.discovery.v3 import discovery_pb2

from legation.xds import _wire
from legation.xds._delta import DeltaStream
from legation.xds._sotw import SotwStream
from legation.xds.auth import Authenticator, Refused, check_node, record
from legation.xds.cache import SnapshotCache
from legation.xds.types import ResourceType

log = logging.getLogger("legation.xds")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 18000
#: Seconds a new connection has to complete its handshake before it is closed.
HANDSHAKE_TIMEOUT = 10.0

_PER_TYPE = {
    ResourceType.CLUSTER: ("envoy.service.cluster.v3.ClusterDiscoveryService", "Clusters"),
    ResourceType.ENDPOINT: ("envoy.service.endpoint.v3.EndpointDiscoveryService", "Endpoints"),
    ResourceType.LISTENER: ("envoy.service.listener.v3.ListenerDiscoveryService", "Listeners"),
    ResourceType.ROUTE: ("envoy.service.route.v3.RouteDiscoveryService", "Routes"),
    ResourceType.SECRET: ("envoy.service.secret.v3.SecretDiscoveryService", "Secrets"),
}


def _identity(data: bytes) -> bytes:
    return data


class XdsServer:
    """ADS and per-type discovery services over one :class:`SnapshotCache`."""

    def __init__(
        self,
        cache: SnapshotCache,
        *,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        gate_timeout: float = 5.0,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
        auth: Authenticator | None = None,
        insecure_unauthenticated_loopback_only: bool = False,
    ) -> None:
        """``auth``: the TLS material and identity checks; required unless
        ``insecure_unauthenticated_loopback_only`` (then ``host`` must be a loopback address)."""
        if auth is None and not insecure_unauthenticated_loopback_only:
            raise ValueError(
                "XdsServer needs auth=<an Authenticator>: xDS hands out private keys, "
                "it never serves unauthenticated clients by default"
            )
        if auth is not None and insecure_unauthenticated_loopback_only:
            raise ValueError(
                "XdsServer: auth and insecure_unauthenticated_loopback_only exclude each other"
            )
        if auth is None and not _is_loopback(host):
            raise ValueError(
                f"XdsServer: refusing to serve unauthenticated xDS on {host!r}; "
                "insecure_unauthenticated_loopback_only needs a loopback host"
            )
        self.auth = auth
        self.cache = cache
        self.host = host
        self.port = port
        self.gate_timeout = gate_timeout
        self.handshake_timeout = handshake_timeout
        self._server: grpc.aio.Server | None = None

    def handlers(self) -> list[grpc.GenericRpcHandler]:
        def sotw(only: ResourceType | None) -> grpc.RpcMethodHandler:
            async def handler(requests: Any, context: Any) -> Any:
                node = await self._authenticate(context)
                async for response in self._stream(SotwStream, requests, context, only, node):
                    yield response

            return grpc.stream_stream_rpc_method_handler(
                handler,
                request_deserializer=discovery_pb2.DiscoveryRequest.FromString,
                response_serializer=_identity,
            )

        def delta(only: ResourceType | None) -> grpc.RpcMethodHandler:
            async def handler(requests: Any, context: Any) -> Any:
                node = await self._authenticate(context)
                async for response in self._stream(DeltaStream, requests, context, only, node):
                    yield response

            return grpc.stream_stream_rpc_method_handler(
                handler,
                request_deserializer=discovery_pb2.DeltaDiscoveryRequest.FromString,
                response_serializer=_identity,
            )

        def fetch(only: ResourceType) -> grpc.RpcMethodHandler:
            async def unary(request: discovery_pb2.DiscoveryRequest, context: Any) -> bytes:
                node = await self._authenticate(context)
                if node is not None:
                    try:
                        check_node(node, request.node.id)
                    except Refused as refused:
                        await self._refuse(context, refused, request.node.id)
                return self._fetch(only, request)

            return grpc.unary_unary_rpc_method_handler(
                unary,
                request_deserializer=discovery_pb2.DiscoveryRequest.FromString,
                response_serializer=_identity,
            )

        out = [
            grpc.method_handlers_generic_handler(
                "envoy.service.discovery.v3.AggregatedDiscoveryService",
                {"StreamAggregatedResources": sotw(None), "DeltaAggregatedResources": delta(None)},
            )
        ]
        for rtype, (service, noun) in _PER_TYPE.items():
            out.append(
                grpc.method_handlers_generic_handler(
                    service,
                    {
                        f"Stream{noun}": sotw(rtype),
                        f"Delta{noun}": delta(rtype),
                        f"Fetch{noun}": fetch(rtype),
                    },
                )
            )
        return out

    def _stream(
        self, cls: type, requests: Any, context: Any, only: ResourceType | None, node: str | None
    ) -> Any:
        stream = cls(self.cache, context, only)
        stream.gate_timeout = self.gate_timeout
        stream.credential = node
        stream.on_refused = self._refuse
        if self.auth is not None:
            auth = self.auth
            stream.recheck = auth.rechecker(context)
        return stream.run(requests)

    async def _authenticate(self, context: Any) -> str | None:
        """The node the caller's credential names (None in the insecure test mode); aborts the
        call when there is no acceptable credential."""
        if self.auth is None:
            return None
        try:
            return self.auth.peer_node(context)
        except Refused as refused:
            await self._refuse(context, refused, "")
            raise AssertionError("unreachable: abort raises") from None

    async def _refuse(self, context: Any, refused: Refused, claimed: str) -> None:
        record(self.cache.metrics, refused, claimed=claimed, peer=context.peer())
        await context.abort(refused.status, refused.message)

    def _fetch(self, rtype: ResourceType, request: discovery_pb2.DiscoveryRequest) -> bytes:
        fleet = request.node.cluster if self.auth is None else ""  # see the module docstring
        snap = self.cache.snapshot_for(request.node.id, fleet)
        if snap is None:
            return _wire.discovery_response(
                version="", type_url=rtype.type_url, nonce="", resource_fields=[]
            )
        available = snap.resources(rtype)
        names = set(request.resource_names) - {"*"}
        chosen = sorted(names & available.keys()) if names else sorted(available)
        return _wire.discovery_response(
            version=snap.version(rtype),
            type_url=rtype.type_url,
            nonce="",
            resource_fields=[available[n].any_field for n in chosen],
        )

    async def start(self) -> XdsServer:
        server = grpc.aio.server(
            options=[
                ("grpc.max_send_message_length", 64 * 1024 * 1024),
                ("grpc.max_receive_message_length", 16 * 1024 * 1024),
                ("grpc.keepalive_time_ms", 30_000),
                ("grpc.server_handshake_timeout_ms", int(self.handshake_timeout * 1000)),
            ]
        )
        server.add_generic_rpc_handlers(self.handlers())
        address = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
        if self.auth is not None:
            bound = server.add_secure_port(address, self.auth.server_credentials())
        else:
            log.warning("xDS server on %s serves UNAUTHENTICATED clients (test mode)", address)
            bound = server.add_insecure_port(address)
        if bound == 0:
            raise OSError(f"xDS server: cannot listen on {self.host}:{self.port}")
        self.port = bound
        await server.start()
        self._server = server
        log.info(
            "xDS server listening on %s:%d (%s)",
            self.host,
            self.port,
            "TLS, client certificates required" if self.auth else "plaintext, no auth",
        )
        return self

    async def stop(self, grace: float | None = 1.0) -> None:
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
