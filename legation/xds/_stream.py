"""What state-of-the-world and delta streams share: node identity, wake-ups, make-before-break.

A stream is one task that alternates between reading requests (a reader task sets ``wake``) and
pumping responses for every type, in ADS send order, whenever something changed: a request arrived
or the cache published a snapshot for this node.

Make-before-break: listeners and routes of a new snapshot are held back until the clusters and the
endpoints they may use have been answered by the proxy (ACK or NACK) and the proxy has subscribed
to the endpoints of every new EDS cluster; clusters that the new snapshot drops are kept until the
listeners and routes no longer need them. A client that never subscribes to EDS is not held back
for longer than ``gate_timeout``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import grpc

from legation.xds._escape import escaped
from legation.xds.auth import Refused, check_node
from legation.xds.cache import SnapshotCache
from legation.xds.snapshot import Snapshot
from legation.xds.types import SEND_ORDER, ResourceType

log = logging.getLogger("legation.xds")

_GATED = (ResourceType.LISTENER, ResourceType.ROUTE)


class _Subscription(Protocol):
    wildcard: bool
    names: set[str]
    nacked: bool


_PREREQUISITES = (ResourceType.CLUSTER, ResourceType.ENDPOINT)


class StreamBase:
    """Per-stream plumbing; subclasses implement the protocol flavour."""

    gate_timeout = 5.0
    #: The node id the caller's credential names (None only in the insecure test mode): every
    #: request that carries a node must name it, or the stream is refused before it yields.
    credential: str | None = None
    on_refused: Callable[[Any, Refused, str], Awaitable[None]] | None = None
    #: Checks the caller's credential again (raises Refused): before every batch of responses
    #: and at least every ``recheck_every`` seconds, so a credential revoked (re-enrolment, a new
    #: xDS root) or expired while its stream is open gets nothing more and the stream is cut.
    recheck: Callable[[], object] | None = None
    recheck_every = 30.0

    def __init__(
        self, cache: SnapshotCache, context: grpc.aio.ServicerContext, only: ResourceType | None
    ) -> None:
        self.cache = cache
        self.context = context
        self.only = only  # set for the per-type (non-ADS) services
        self.node_id = ""
        self.node_cluster = ""
        self.wake = asyncio.Event()
        self._nonces = itertools.count(1)
        self._watch: int | None = None
        self._blocked_since: float | None = None
        self.closed = False
        self.ended = False  # the client half-closed (no error): answer what is due, then end
        self.types: dict[ResourceType, _Subscription] = {}

    # -- to implement ----------------------------------------------------------------------

    def handle(self, request: Any) -> None:
        raise NotImplementedError

    def pending_responses(self, snap: Snapshot) -> list[bytes]:
        raise NotImplementedError

    def settled(self, rtype: ResourceType, snap: Snapshot) -> bool:
        """The proxy has answered the latest response of this type and nothing new is due."""
        raise NotImplementedError

    # -- subscription queries (both flavours keep a _Subscription per type in ``types``) ----

    def has_subscription(self, rtype: ResourceType) -> bool:
        return rtype in self.types

    def covers(self, rtype: ResourceType, names: set[str]) -> bool:
        """The proxy has subscribed to all of ``names`` (or to everything) for ``rtype``."""
        st = self.types.get(rtype)
        if st is None:
            return not names
        return st.wildcard or names <= st.names

    def rejected(self, rtype: ResourceType) -> bool:
        """The proxy NACKed the latest response of ``rtype``."""
        st = self.types.get(rtype)
        return st is not None and st.nacked

    # -- shared machinery ------------------------------------------------------------------

    def nonce(self) -> str:
        return str(next(self._nonces))

    @property
    def fleet(self) -> str:
        """The fleet whose snapshot serves this node if it has none of its own: its claimed
        cluster, but only on a server that does not authenticate nodes (an authenticated node
        gets its own snapshot or nothing)."""
        return self.node_cluster if self.credential is None else ""

    def identify(self, node: Any) -> None:
        if self.node_id or not node.id:
            return
        self.node_id = node.id
        self.node_cluster = node.cluster
        self._watch = self.cache.watch(
            self.node_id, self.node_cluster, self.wake.set, fleet=self.fleet
        )
        log.info("%s connected (cluster %s)", escaped(self.node_id), escaped(self.node_cluster))

    async def run(self, requests: Any) -> Any:
        """The async generator a grpc.aio stream handler returns: yields response bytes."""
        reader = asyncio.create_task(self._read(requests))
        try:
            while True:
                if self.recheck is None:
                    await self.wake.wait()
                else:
                    try:
                        async with asyncio.timeout(self.recheck_every):
                            await self.wake.wait()
                    except TimeoutError:
                        pass
                self.wake.clear()
                if self.closed and not self.ended:
                    return
                if self.recheck is not None:
                    try:
                        self.recheck()
                    except Refused as refused:
                        self.closed = True
                        assert self.on_refused is not None
                        await self.on_refused(self.context, refused, self.node_id)
                        return
                snap = self.cache.snapshot_for(self.node_id, self.fleet) if self.node_id else None
                if snap is not None:
                    for response in self.pending_responses(snap):
                        yield response
                if self.closed:  # the client is done sending: what was due has gone out
                    return
        finally:
            reader.cancel()
            if self._watch is not None:
                self.cache.unwatch(self._watch)
                log.info("%s disconnected", escaped(self.node_id))

    async def _read(self, requests: Any) -> None:
        try:
            async for request in requests:
                if self.credential is not None and request.node.id:
                    try:
                        check_node(self.credential, request.node.id)
                    except Refused as refused:
                        self.closed = True
                        assert self.on_refused is not None
                        await self.on_refused(self.context, refused, request.node.id)
                if not self.node_id:
                    self.identify(request.node)
                    if not self.node_id:
                        await self.context.abort(
                            grpc.StatusCode.INVALID_ARGUMENT,
                            "the first DiscoveryRequest on a stream must carry node.id",
                        )
                try:
                    rtype = ResourceType.from_url(request.type_url)
                except ValueError:
                    log.warning(
                        "%s asked for unsupported type %s",
                        escaped(self.node_id),
                        escaped(request.type_url),
                    )
                    continue
                if self.only is not None and rtype is not self.only:
                    log.warning(
                        "%s asked for %s on the %s service",
                        escaped(self.node_id),
                        rtype.short,
                        self.only.short,
                    )
                    continue
                self.handle(request)
                self.wake.set()
            self.ended = not self.closed
        except (asyncio.CancelledError, grpc.aio.AioRpcError, grpc.aio.AbortError):
            pass
        finally:
            self.closed = True
            self.wake.set()

    def gate_open(self, rtype: ResourceType, snap: Snapshot) -> bool:
        """Whether responses of ``rtype`` may go out now (make-before-break)."""
        if self.only is not None or rtype not in _GATED:
            return True
        ready = all(self.settled(t, snap) for t in _PREREQUISITES if self.has_subscription(t))
        if (
            ready
            and self.has_subscription(ResourceType.CLUSTER)
            and not self.rejected(ResourceType.CLUSTER)
        ):
            # Envoy subscribes to a new cluster's endpoints once it has accepted the cluster.
            ready = self.covers(ResourceType.ENDPOINT, snap.eds_names())
        if ready:
            self._blocked_since = None
            return True
        now = time.monotonic()
        if self._blocked_since is None:
            self._blocked_since = now
            asyncio.get_running_loop().call_later(self.gate_timeout, self.wake.set)
        elif now - self._blocked_since >= self.gate_timeout:
            log.warning(
                "%s: sending %s without waiting for clusters/endpoints to settle",
                escaped(self.node_id),
                rtype.short,
            )
            return True
        return False

    def routes_settled(self, snap: Snapshot) -> bool:
        """Listeners and routes no longer need clusters the snapshot dropped."""
        return all(self.settled(t, snap) for t in _GATED if self.has_subscription(t))

    @staticmethod
    def send_order(only: ResourceType | None) -> tuple[ResourceType, ...]:
        return (only,) if only is not None else SEND_ORDER
