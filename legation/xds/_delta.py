"""Incremental (delta) streams: only what changed is sent, removals are named.

Per type the stream tracks the version of every resource the proxy has (seeded from
``initial_resource_versions`` on reconnect, then from what was sent), and sends the resources whose
version differs and the names that disappeared. One response per type is in flight at a time.
A NACK is recorded and not retried: the versions sent are kept as the proxy's, so the same bytes are
not offered again until the resource itself changes. Removals of clusters wait until listeners and
routes are settled (make-before-break).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from envoy.service.discovery.v3 import discovery_pb2

from legation.xds import _wire
from legation.xds._stream import StreamBase
from legation.xds.snapshot import Resource, Snapshot
from legation.xds.types import ResourceType


@dataclass
class _TypeState:
    wildcard: bool = False
    names: set[str] = field(default_factory=set)
    known: dict[str, str] = field(default_factory=dict)  # name -> version the proxy has
    inflight: str = ""  # nonce of the response awaiting an answer
    sent_version: str = ""
    nacked: bool = False
    resumed: bool = False  # reconnected with initial_resource_versions, not yet compared
    synced: Snapshot | None = None  # the snapshot whose resources the proxy has exactly


class DeltaStream(StreamBase):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.types: dict[ResourceType, _TypeState] = {}  # type: ignore[assignment]

    def handle(self, request: discovery_pb2.DeltaDiscoveryRequest) -> None:
        rtype = ResourceType.from_url(request.type_url)
        st = self.types.get(rtype)
        if st is None:
            st = self.types[rtype] = _TypeState()
            st.known = dict(request.initial_resource_versions)
            st.resumed = bool(st.known)
            subscribe = set(request.resource_names_subscribe)
            # A first request naming nothing is the legacy wildcard for CDS and LDS.
            st.wildcard = "*" in subscribe or (rtype.wildcard_by_default and not subscribe)
        if request.response_nonce and request.response_nonce == st.inflight:
            st.inflight = ""
            if request.HasField("error_detail"):
                st.nacked = True
                self.cache.record_nack(
                    self.node_id, rtype, st.sent_version, request.error_detail.message
                )
            else:
                st.nacked = False
                self.cache.record_ack(self.node_id, rtype, st.sent_version)
        if request.resource_names_subscribe or request.resource_names_unsubscribe:
            st.synced = None  # the subscription changed: compare everything once
        for name in request.resource_names_subscribe:
            if name == "*":
                st.wildcard = True
            else:
                st.names.add(name)
        for name in request.resource_names_unsubscribe:
            if name == "*":
                st.wildcard = False
            else:
                st.names.discard(name)
                if not st.wildcard:
                    st.known.pop(name, None)  # the proxy forgets it; a resubscribe resends it

    def _changes(
        self, rtype: ResourceType, st: _TypeState, snap: Snapshot
    ) -> tuple[list[Resource], list[str], bool]:
        """What to send: updates, removals, and whether that brings the proxy exactly to ``snap``
        (False while cluster removals wait for the routes)."""
        available = snap.resources(rtype)
        base = st.synced
        if base is not None and base.version(rtype) == snap.version(rtype):
            return [], [], True
        if base is not None:
            # Work in proportion to what changed, not to the size of the snapshot.
            changed, gone = snap.diff(base, rtype)
            wanted: Iterable[str] = (
                changed if st.wildcard else (n for n in changed if n in st.names)
            )
            candidates = gone
        else:
            wanted = available.keys() if st.wildcard else st.names & available.keys()
            candidates = frozenset(st.known)
        updates = [available[n] for n in sorted(wanted) if st.known.get(n) != available[n].version]
        removed = sorted(
            n
            for n in candidates
            if n in st.known and n not in available and (st.wildcard or n in st.names)
        )
        if removed and rtype is ResourceType.CLUSTER and self.only is None:
            if not self.routes_settled(snap):
                return updates, [], False  # break after make: listeners and routes first
        return updates, removed, True

    def pending_responses(self, snap: Snapshot) -> list[bytes]:
        out = []
        for rtype in self.send_order(self.only):
            st = self.types.get(rtype)
            if st is None or st.inflight:
                continue
            updates, removed, complete = self._changes(rtype, st, snap)
            if complete and not (updates or removed):
                st.synced = snap
            if st.resumed and not (updates or removed):
                # The proxy came back with exactly the current resources: report it as current.
                self.cache.record_ack(self.node_id, rtype, snap.version(rtype))
            st.resumed = False
            if not (updates or removed) or not self.gate_open(rtype, snap):
                continue
            st.inflight = self.nonce()
            st.sent_version = snap.version(rtype)
            for res in updates:
                st.known[res.name] = res.version
            for name in removed:
                st.known.pop(name, None)
            if complete:
                st.synced = snap
            data = _wire.delta_discovery_response(
                system_version=st.sent_version,
                type_url=rtype.type_url,
                nonce=st.inflight,
                resource_fields=[res.delta_field for res in updates],
                removed=removed,
            )
            self.cache.record_push(self.node_id, rtype, len(data))
            out.append(data)
        return out

    def settled(self, rtype: ResourceType, snap: Snapshot) -> bool:
        st = self.types.get(rtype)
        if st is None:
            return True
        if st.inflight:
            return False
        updates, _, _ = self._changes(rtype, st, snap)
        return not updates
