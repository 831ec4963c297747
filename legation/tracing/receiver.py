"""The embedded OTLP/gRPC receiver: ``TraceService/Export`` into a :class:`TraceStore`.

``legation up`` (through the control plane, ``tracing: {collector: embedded}``) runs it on
``127.0.0.1:<tracing.port>``; every proxy's tracer and Legation's services export to it, and
the control plane's status server reads it (``/traces``) for ``legation traces``. It accepts
requests up to :data:`MAX_MESSAGE` bytes; one that does not parse is answered
``INVALID_ARGUMENT``; spans it could not keep (their trace full) are counted in the store's
``dropped`` (the OTLP messages of xds-protos predate ``partial_success``).

With the mesh's mTLS on (``tracing.tls`` not ``none``) it serves mutual TLS like the
request-path services: the certificate ``spiffe://<td>/ns/<ns>/sa/legation-tracing`` from the
mesh CA (the control plane's :meth:`~legation.certs.MeshIssuer.service_tls` ``("tracing")``,
asked before every handshake, so renewals and a root rotation's two-root bundle need no
restart), and only clients whose certificate chains to the mesh's trust bundle get through the
handshake (a plaintext client, or a certificate from another CA, never reaches ``Export``).
Then a peer exports only under its own name (:class:`PeerCheck`): every ``service.name`` in the
request must be the peer's SPIFFE service name (a sidecar's service, the gateway's name), or,
for Legation's own services (``legation-<kind>``, reserved names), any of theirs; anything else
is ``PERMISSION_DENIED`` and counted (``refused``), nothing of it stored.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

from legation.certs.spiffe import TRACING, peer_spiffe_id, service_name
from legation.errors import LegationError
from legation.grpc_server import ServerTls, TlsSource, start_grpc_server
from legation.tracing.otlp import SERVICE, from_request, service_names
from legation.tracing.store import TraceStore

if TYPE_CHECKING:
    from legation.config.model import Mesh
    from legation.config.tracing import Tracing

__all__ = ["MAX_MESSAGE", "EmbeddedCollector", "PeerCheck", "TraceReceiver"]

MAX_MESSAGE = 4 * 1024 * 1024


@dataclass(frozen=True)
class PeerCheck:
    """Who may export spans under which service name, with mTLS: ids under ``prefix``
    (``spiffe://<td>/ns/<ns>/sa/``) export under their own name; ``legation`` names (Legation's
    services, reserved in the mesh) under any of those names (the ext_authz process records the
    fused call's rate-limit spans)."""

    prefix: str
    legation: frozenset[str]

    @classmethod
    def of(cls, mesh: Mesh) -> PeerCheck:
        from legation.services.kinds import names

        m = mesh.mtls
        return cls(
            prefix=f"spiffe://{m.trust_domain}/ns/{m.namespace}/sa/",
            legation=frozenset(service_name(k) for k in (*names(), TRACING)),
        )

    def allows(self, peer: str | None, services: Iterable[str]) -> bool:
        if peer is None or not peer.startswith(self.prefix):
            return False
        own = peer[len(self.prefix) :]
        mine = self.legation if own in self.legation else frozenset({own})
        return all(s in mine for s in services)


class TraceReceiver:
    """An OTLP/gRPC trace receiver on ``host:port`` (0: any free port) keeping spans in
    ``store``; with ``tls`` (and ``peers``) mutual TLS, each export checked against its peer."""

    def __init__(
        self,
        store: TraceStore,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        tls: ServerTls | TlsSource | None = None,
        peers: PeerCheck | None = None,
    ) -> None:
        self.store = store
        self.host = host
        self.port = port
        self.tls = tls
        self.peers = peers
        self.refused = 0
        self._server: grpc.aio.Server | None = None

    async def start(self) -> TraceReceiver:
        self._server, self.port = await start_grpc_server(
            "tracing",
            self._register,
            host=self.host,
            port=self.port,
            options=[("grpc.max_receive_message_length", MAX_MESSAGE)],
            tls=self.tls,
        )
        return self

    async def stop(self, grace: float = 0.5) -> None:
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None

    def _register(self, server: grpc.aio.Server) -> None:
        handler = grpc.unary_unary_rpc_method_handler(
            self.export,
            response_serializer=trace_service_pb2.ExportTraceServiceResponse.SerializeToString,
        )
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE, {"Export": handler}),)
        )

    async def export(self, raw: bytes, context: Any) -> Any:
        try:
            request = trace_service_pb2.ExportTraceServiceRequest.FromString(raw)
        except DecodeError:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "not an ExportTraceServiceRequest"
            )
        if self.peers is not None:
            peer = peer_spiffe_id(context.auth_context())
            if not self.peers.allows(peer, service_names(request)):
                self.refused += 1
                await context.abort(
                    grpc.StatusCode.PERMISSION_DENIED, "spans only under the peer's own name"
                )
        self.store.add(list(from_request(request)))
        return trace_service_pb2.ExportTraceServiceResponse()


class EmbeddedCollector:
    """The receiver a mesh asks for (``tracing: {collector: embedded}``), following reloads:
    started when the block appears, moved when its port changes (the traces kept), its caps
    applied (the next span evicts down to them), stopped when the block goes or names another
    collector; restarted when its TLS is turned on or off (on the same port: stopped first, so
    a failed start there leaves none).
    ``tls_source(kind)``: the certificate the receiver serves with mTLS (kind ``tracing``)."""

    def __init__(self, tls_source: Callable[[str], ServerTls | None] | None = None) -> None:
        self.tls_source = tls_source
        self.receiver: TraceReceiver | None = None

    @property
    def refused(self) -> int:
        return self.receiver.refused if self.receiver is not None else 0

    @property
    def store(self) -> TraceStore | None:
        return self.receiver.store if self.receiver is not None else None

    async def follow(self, tracing: Tracing | None, *, peers: PeerCheck | None = None) -> None:
        """Match ``tracing``, serving mTLS when ``peers`` says who may export (None:
        plaintext); raises ``BindError`` (the old receiver kept) when its port cannot be bound,
        a LegationError when mTLS is asked for and there is no certificate."""
        if tracing is None or not tracing.embedded:
            await self.stop()
            return
        host, port = tracing.address()
        running = self.receiver
        tls = self._tls() if peers is not None else None
        if running is not None and running.port == port and (running.tls is None) == (tls is None):
            running.store.max_traces, running.store.max_spans = tracing.trace_cap, tracing.span_cap
            running.peers = peers
            return
        store = running.store if running is not None else None
        if store is None:
            store = TraceStore(max_traces=tracing.trace_cap, max_spans=tracing.span_cap)
        store.max_traces, store.max_spans = tracing.trace_cap, tracing.span_cap
        if running is not None and running.port == port:  # TLS on or off: the same port
            await running.stop()
            self.receiver = running = None
        self.receiver = await TraceReceiver(
            store, host=host, port=port, tls=tls, peers=peers
        ).start()
        if running is not None:
            await running.stop()

    async def stop(self) -> None:
        if self.receiver is not None:
            await self.receiver.stop()
            self.receiver = None

    def _tls(self) -> TlsSource:
        source = self.tls_source
        if source is None or source(TRACING) is None:
            raise LegationError(
                "tracing: no mesh certificate to serve mTLS with", code="service_start_failed"
            )
        return lambda: source(TRACING)
