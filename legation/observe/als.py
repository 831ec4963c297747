"""The access-log service Envoy streams finished requests to, feeding an :class:`Aggregator`.

Envoy's gRPC access logger (``envoy.access_loggers.http_grpc``) opens one
``StreamAccessLogs`` stream per worker thread and log name, sends the node and log name in the
stream's first message only, and batches entries (flushed every ``buffer_flush_interval`` or
when ``buffer_size_bytes`` fill up, see :func:`legation.observe.envoy_config.access_log`). The
stream never gets an answer; it ends when Envoy closes it.

With mTLS, a stream's peer must be the proxy it names: ``identities`` (node id -> SPIFFE id, the
mesh's) decides, and a stream whose first message names a node the peer's certificate is not is
refused (``PERMISSION_DENIED``, counted in ``refused``), so one proxy cannot write entries, golden
metrics or JSON lines under another's name; so is a stream sending entries before it names its
node, and the node's cluster (the source of pair metrics) is the mesh's, not the one claimed.

Only the fields golden metrics need are read (route name, upstream cluster, response code,
duration). The request's path, headers and addresses that an entry also carries are never kept,
except as the JSON access-log lines of proxies configured ``to: service``
(:mod:`legation.observe.jsonlines`).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc

from legation.certs.spiffe import peer_spiffe_id
from legation.grpc_server import ServerTls, TlsSource, start_grpc_server
from legation.observe.aggregator import Aggregator, Entry
from legation.observe.jsonlines import JsonSink

__all__ = ["AccessLogServicer", "entry_of", "start_als_server"]

log = logging.getLogger("legation.observe.als")

SERVICE = "accesslog"


def entry_of(
    node_id: str, node_cluster: str, log_name: str, http: accesslog_pb2.HTTPAccessLogEntry
) -> Entry:
    """The aggregator's view of one HTTP entry. The duration is Envoy's ``duration`` (first
    downstream byte received to last byte sent), falling back to the time to the last
    downstream byte sent."""
    common = http.common_properties
    if common.HasField("duration"):
        ms = common.duration.ToNanoseconds() / 1e6
    else:
        ms = common.time_to_last_downstream_tx_byte.ToNanoseconds() / 1e6
    return Entry(
        node_id=node_id,
        node_cluster=node_cluster,
        log_name=log_name,
        route=common.route_name,
        upstream_cluster=common.upstream_cluster,
        code=http.response.response_code.value,
        duration_ms=ms,
    )


class AccessLogServicer(als_pb2_grpc.AccessLogServiceServicer):  # type: ignore[misc]
    """``StreamAccessLogs``: every HTTP entry of every stream into ``aggregator``. TCP entries
    are counted in ``tcp_entries`` and otherwise ignored."""

    def __init__(
        self,
        aggregator: Aggregator,
        *,
        sink: JsonSink | None = None,
        identities: dict[str, str] | None = None,
    ) -> None:
        """``sink``: writes the JSON access-log lines of the proxies it names. ``identities``:
        node id -> the SPIFFE id its peer must have (None: no check, plaintext meshes)."""
        self.aggregator = aggregator
        self.sink = sink
        self.identities = identities
        self.clusters: dict[str, str] | None = None  # with identities: node id -> its cluster
        self.refused = 0
        self.streams = 0
        self.open_streams = 0
        self.entries = 0
        self.tcp_entries = 0

    async def StreamAccessLogs(
        self, request_iterator: AsyncIterator[als_pb2.StreamAccessLogsMessage], context: Any
    ) -> als_pb2.StreamAccessLogsResponse:
        self.streams += 1
        self.open_streams += 1
        node_id = node_cluster = log_name = ""
        try:
            async for message in request_iterator:
                if message.HasField("identifier"):
                    node = message.identifier.node
                    node_id, node_cluster = node.id, node.cluster
                    log_name = message.identifier.log_name
                    await self._check_peer(node_id, context)
                    if self.clusters is not None:  # the mesh's cluster, not the claimed one
                        node_cluster = self.clusters.get(node_id, "")
                elif self.identities is not None and not node_id:
                    await self._refuse(context, "", "entries before the stream named its node")
                if message.HasField("http_logs"):
                    record = self.aggregator.record
                    for http in message.http_logs.log_entry:
                        record(entry_of(node_id, node_cluster, log_name, http))
                    self.entries += len(message.http_logs.log_entry)
                    sink = self.sink
                    if sink is not None and sink.wants(node_id):
                        sink.write(node_id, log_name, message.http_logs.log_entry)
                elif message.HasField("tcp_logs"):
                    self.tcp_entries += len(message.tcp_logs.log_entry)
        finally:
            self.open_streams -= 1
        return als_pb2.StreamAccessLogsResponse()

    async def _check_peer(self, node_id: str, context: Any) -> None:
        identities = self.identities
        if identities is None:
            return
        peer = peer_spiffe_id(context.auth_context())
        if peer is not None and identities.get(node_id) == peer:
            return
        await self._refuse(context, peer, f"it names node {node_id[:200]!r}")

    async def _refuse(self, context: Any, peer: str | None, why: str) -> None:
        self.refused += 1
        if self.refused <= 10 or self.refused % 1000 == 0:  # one peer cannot flood the log
            log.warning(
                "access-log stream refused: %s, the peer is %r (%d refused)",
                why,
                peer,
                self.refused,
            )
        await context.abort(
            grpc.StatusCode.PERMISSION_DENIED, "the stream names a node that is not its peer"
        )


async def start_als_server(
    servicer: AccessLogServicer,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    tls: ServerTls | TlsSource | None = None,
) -> tuple[grpc.aio.Server, int]:
    """Serve ``servicer`` on ``host:port`` (0: ephemeral); returns the server and its port.
    A port that cannot be bound raises :class:`legation.grpc_server.BindError`."""

    def register(server: grpc.aio.Server) -> None:
        als_pb2_grpc.add_AccessLogServiceServicer_to_server(servicer, server)

    return await start_grpc_server(SERVICE, register, host=host, port=port, tls=tls)
