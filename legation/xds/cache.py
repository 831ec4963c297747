"""The snapshot cache: the one place the translation hands its output to the ADS server.

``set_snapshot(node_id, snapshot)`` checks the snapshot and, after a debounce, publishes it to
every stream of that node. Fleet snapshots live in a namespace of their own:
``set_fleet_snapshot(cluster, snapshot)`` serves every proxy that names ``cluster`` as its node
cluster and has no snapshot of its own, without the SDS secrets (a key is one proxy's, never a
fleet's, and the cluster is only the client's claim). Node ids and clusters never meet: a node
cluster that happens to be another node's id finds nothing. The authenticating server does not
use fleets at all (it asks with no cluster; the control plane publishes one snapshot per node);
they are for library users serving xDS without it.
Bursts of changes within ``debounce`` seconds coalesce into one push; a steady stream of
changes is still published at least every ``max_delay`` seconds. An inconsistent snapshot raises
and replaces nothing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from legation.xds._escape import escaped
from legation.xds.metrics import XdsMetrics
from legation.xds.snapshot import Snapshot
from legation.xds.types import ResourceType

log = logging.getLogger("legation.xds")

Wakeup = Callable[[], None]

#: NACK messages are the proxy's text: kept and logged at most this long.
NACK_MESSAGE_LIMIT = 1024


@dataclass
class Nack:
    type: str
    version: str
    message: str
    at: float


@dataclass
class NodeStatus:
    """What ``legation status`` and the metrics report about one proxy."""

    node_id: str
    cluster: str = ""
    streams: int = 0
    connected_since: float | None = None
    acked: dict[str, str] = field(default_factory=dict)
    last_nack: Nack | None = None
    nacks: int = 0
    pushes: int = 0

    def as_dict(self) -> dict[str, object]:
        return {
            "node_id": self.node_id,
            "cluster": self.cluster,
            "connected": self.streams > 0,
            "streams": self.streams,
            "connected_since": self.connected_since,
            "acked": dict(self.acked),
            "nacks": self.nacks,
            "pushes": self.pushes,
            "last_nack": None
            if self.last_nack is None
            else {
                "type": self.last_nack.type,
                "version": self.last_nack.version,
                "message": self.last_nack.message,
                "at": self.last_nack.at,
            },
        }


class SnapshotCache:
    def __init__(
        self,
        *,
        debounce: float = 0.1,
        max_delay: float = 10.0,
        metrics: XdsMetrics | None = None,
    ) -> None:
        if debounce < 0 or max_delay < debounce:
            raise ValueError("need 0 <= debounce <= max_delay")
        self.debounce = debounce
        self.max_delay = max_delay
        self.metrics = metrics or XdsMetrics()
        self._published: dict[str, Snapshot] = {}  # node id -> its snapshot
        self._fleets: dict[str, Snapshot] = {}  # node cluster -> the fleet's snapshot
        self._shared: dict[str, tuple[Snapshot, Snapshot]] = {}  # cluster -> (full, no secrets)
        self._pending: dict[tuple[bool, str], Snapshot] = {}  # (is a fleet's, key) -> snapshot
        self._first_pending: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._watchers: dict[int, tuple[str, str, Wakeup]] = {}
        self._next_watch = 0
        self.status: dict[str, NodeStatus] = {}
        self.publications = 0  # how many debounced publications happened (tests, metrics)

    # -- producer side ---------------------------------------------------------------------

    def set_snapshot(self, key: str, snapshot: Snapshot) -> None:
        """Stage ``snapshot`` for the node id ``key``; published after the debounce.

        Raises :class:`~legation.xds.snapshot.InconsistentSnapshot` (and stages nothing) if a
        cluster or listener references an EDS or RDS resource the snapshot lacks.
        """
        self._stage((False, key), snapshot)

    def set_fleet_snapshot(self, cluster: str, snapshot: Snapshot) -> None:
        """Stage ``snapshot`` for the proxies whose node cluster is ``cluster`` and that have no
        snapshot of their own (served without its secrets, and only by a server that does not
        authenticate nodes). Raises as :meth:`set_snapshot` does."""
        self._stage((True, cluster), snapshot)

    def _stage(self, key: tuple[bool, str], snapshot: Snapshot) -> None:
        snapshot.check_consistent()
        self._pending[key] = snapshot
        if self.debounce == 0:
            self._publish()
            return
        now = time.monotonic()
        if self._first_pending is None:
            self._first_pending = now
        if self._timer is not None:
            self._timer.cancel()
        wait = min(self.debounce, self._first_pending + self.max_delay - now)
        self._timer = asyncio.get_running_loop().call_later(max(wait, 0.0), self._publish)

    def clear_snapshot(self, key: str) -> None:
        """Forget node ``key``'s snapshot."""
        self._pending.pop((False, key), None)
        self._published.pop(key, None)
        st = self.status.get(key)
        if st is not None and st.streams == 0:
            del self.status[key]

    def clear_fleet_snapshot(self, cluster: str) -> None:
        self._pending.pop((True, cluster), None)
        self._fleets.pop(cluster, None)
        self._shared.pop(cluster, None)

    def flush(self) -> None:
        """Publish what is staged now, without waiting for the debounce."""
        self._publish()

    def _publish(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._first_pending = None
        if not self._pending:
            return
        nodes = {key for fleet, key in self._pending if not fleet}
        fleets = {key for fleet, key in self._pending if fleet}
        for (fleet, key), snapshot in self._pending.items():
            (self._fleets if fleet else self._published)[key] = snapshot
        self._pending.clear()
        self.publications += 1
        for node_id, cluster, wake in list(self._watchers.values()):
            if node_id in nodes or cluster in fleets:
                wake()

    # -- consumer side (the ADS server) ------------------------------------------------------

    def snapshot_for(self, node_id: str, cluster: str) -> Snapshot | None:
        """The node's own snapshot, else its fleet's (by ``cluster``; ``""``: no fleet) without
        secrets."""
        snap = self._published.get(node_id)
        if snap is not None or not cluster:
            return snap
        shared = self._fleets.get(cluster)
        if shared is None:
            return None
        memo = self._shared.get(cluster)
        if memo is None or memo[0] is not shared:
            memo = self._shared[cluster] = (shared, shared.without_secrets())
        return memo[1]

    def snapshot(self, key: str) -> Snapshot | None:
        """Node ``key``'s published snapshot."""
        return self._published.get(key)

    def watch(self, node_id: str, cluster: str, wake: Wakeup, *, fleet: str | None = None) -> int:
        """Call ``wake`` when node ``node_id``'s snapshot, or fleet ``fleet``'s (default
        ``cluster``; ``""``: none), is published. ``cluster`` is what status reports."""
        self._next_watch += 1
        self._watchers[self._next_watch] = (node_id, cluster if fleet is None else fleet, wake)
        st = self.node_status(node_id, cluster)
        if st.streams == 0:
            st.connected_since = time.time()
        st.streams += 1
        self.metrics.connected.set(sum(1 for s in self.status.values() if s.streams))
        return self._next_watch

    def unwatch(self, watch_id: int) -> None:
        entry = self._watchers.pop(watch_id, None)
        if entry is None:
            return
        st = self.status.get(entry[0])
        if st is not None:
            st.streams -= 1
            if st.streams == 0:
                st.connected_since = None
                own = entry[0] in self._published or (False, entry[0]) in self._pending
                if not own:
                    del self.status[entry[0]]  # a node with no snapshot of its own: forget it
        self.metrics.connected.set(sum(1 for s in self.status.values() if s.streams))

    def node_status(self, node_id: str, cluster: str = "") -> NodeStatus:
        st = self.status.get(node_id)
        if st is None:
            st = self.status[node_id] = NodeStatus(node_id=node_id, cluster=cluster)
        elif cluster:
            st.cluster = cluster
        return st

    # -- protocol events, recorded for status and metrics -------------------------------------

    # Only streams that are watching (so authenticated) record; a node's status exists while it
    # has a stream or a snapshot of its own, so what a client sends never grows it unboundedly.

    def record_push(self, node_id: str, rtype: ResourceType, nbytes: int) -> None:
        st = self.status.get(node_id)
        if st is not None:
            st.pushes += 1
        self.metrics.pushes.labels(rtype.short).inc()
        self.metrics.push_bytes.labels(rtype.short).inc(nbytes)

    def record_ack(self, node_id: str, rtype: ResourceType, version: str) -> None:
        st = self.status.get(node_id)
        if st is not None:
            st.acked[rtype.short] = version[:128]
        self.metrics.acks.labels(rtype.short).inc()

    def record_nack(self, node_id: str, rtype: ResourceType, version: str, message: str) -> None:
        st = self.status.get(node_id)
        if st is not None:
            st.nacks += 1
            st.last_nack = Nack(
                type=rtype.short,
                version=version,
                message=message[:NACK_MESSAGE_LIMIT],
                at=time.time(),
            )
        self.metrics.nacks.labels(rtype.short).inc()
        log.warning(
            "%s rejected %s version %s: %s (not resent until the config changes)",
            escaped(node_id),
            rtype.short,
            version,
            escaped(message, NACK_MESSAGE_LIMIT),
        )
