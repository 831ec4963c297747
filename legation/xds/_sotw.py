"""State-of-the-world streams: every response carries all subscribed resources of its type.

Per type: a response is sent only while the proxy has a request outstanding (its ACK or NACK of the
previous response re-arms it) and only when what it would carry differs from what was last sent.
That one rule gives both "unchanged resources are not re-pushed" and "a rejected version is never
resent": after a NACK the content is unchanged, so nothing goes out until the config changes.
Requests whose ``response_nonce`` is not the latest one sent are stale and ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from envoy.service.discovery.v3 import discovery_pb2

from legation.xds import _wire
from legation.xds._stream import StreamBase
from legation.xds.snapshot import Resource, Snapshot
from legation.xds.types import ResourceType

Key = tuple[Any, ...]


@dataclass
class _TypeState:
    wildcard: bool = False
    names: set[str] = field(default_factory=set)
    explicit: bool = False  # the proxy has named resources at least once
    pending: bool = False  # a request is waiting for a response
    nonce: str = ""
    sent_version: str = ""
    sent_key: Key | None = None
    held: dict[str, Resource] = field(default_factory=dict)  # what the last response carried
    accepted: dict[str, Resource] = field(default_factory=dict)  # what the proxy last ACKed
    nacked: bool = False
    client_version: str = ""  # the version a reconnecting proxy says it has
    generation: int = 0  # bumped when the subscription changes
    memo: tuple[Snapshot, int, dict[str, Resource], Key] | None = None


class SotwStream(StreamBase):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.types: dict[ResourceType, _TypeState] = {}  # type: ignore[assignment]

    def handle(self, request: discovery_pb2.DiscoveryRequest) -> None:
        rtype = ResourceType.from_url(request.type_url)
        st = self.types.get(rtype)
        first = st is None
        if st is None:
            st = self.types[rtype] = _TypeState()
        if request.response_nonce:
            if request.response_nonce != st.nonce:
                return  # stale: answers a response that has since been superseded
            if request.HasField("error_detail"):
                st.nacked = True
                self.cache.record_nack(
                    self.node_id, rtype, st.sent_version, request.error_detail.message
                )
            else:
                st.nacked = False
                st.accepted = st.held
                self.cache.record_ack(self.node_id, rtype, request.version_info)
        self._subscribe(rtype, st, list(request.resource_names))
        st.pending = True
        if first and request.version_info:
            # Reconnect (e.g. the control plane restarted): the proxy runs this version already.
            st.client_version = request.version_info
            self.cache.record_ack(self.node_id, rtype, request.version_info)

    @staticmethod
    def _subscribe(rtype: ResourceType, st: _TypeState, names: list[str]) -> None:
        before = (st.wildcard, st.names)
        SotwStream._apply_subscription(rtype, st, names)
        if (st.wildcard, st.names) != before:
            st.generation += 1

    @staticmethod
    def _apply_subscription(rtype: ResourceType, st: _TypeState, names: list[str]) -> None:
        if "*" in names:
            st.wildcard = True
            st.explicit = True
            st.names = set(names) - {"*"}
        elif names:
            st.wildcard = False
            st.explicit = True
            st.names = set(names)
        else:
            # An empty list is the legacy wildcard for CDS/LDS until names were ever given;
            # for EDS/RDS/SDS it means "nothing".
            st.wildcard = rtype.wildcard_by_default and not st.explicit
            st.names = set()

    def _selection(
        self, rtype: ResourceType, st: _TypeState, snap: Snapshot
    ) -> tuple[dict[str, Resource], Key]:
        """What a response of ``rtype`` would carry now, and a key that is equal exactly when
        the content is. Memoised per snapshot and subscription, so a stream woken for another
        type's change does no work proportional to this type's size."""
        if st.memo is not None and st.memo[0] is snap and st.memo[1] == st.generation:
            desired, key = st.memo[2], st.memo[3]
        else:
            available = snap.resources(rtype)
            if st.wildcard:
                desired = dict(available)
                key = ("*", snap.version(rtype))
            else:
                desired = {n: available[n] for n in st.names if n in available}
                key = ("=", frozenset((n, r.version) for n, r in desired.items()))
            st.memo = (snap, st.generation, desired, key)
        if rtype is ResourceType.CLUSTER and self.only is None and not self.routes_settled(snap):
            # Keep dropped clusters until listeners and routes have moved off them.
            kept = {n: r for n, r in st.accepted.items() if n not in desired}
            if kept:
                desired = {**desired, **kept}
                key = ("+", key, frozenset((n, r.version) for n, r in kept.items()))
        return desired, key

    def pending_responses(self, snap: Snapshot) -> list[bytes]:
        out = []
        for rtype in self.send_order(self.only):
            st = self.types.get(rtype)
            if st is None or not st.pending:
                continue
            desired, key = self._selection(rtype, st, snap)
            if st.sent_key is None and st.client_version == snap.version(rtype):
                # Versions are content hashes: an equal version means equal resources.
                st.sent_key, st.sent_version = key, st.client_version
                st.held = st.accepted = desired
            if key == st.sent_key or not self.gate_open(rtype, snap):
                continue
            version = snap.version(rtype)
            if any(name not in snap.resources(rtype) for name in desired):
                version += "+kept"  # an interim response that still carries dropped clusters
            st.nonce = self.nonce()
            st.sent_version = version
            st.sent_key = key
            st.held = desired
            st.pending = False
            data = _wire.discovery_response(
                version=version,
                type_url=rtype.type_url,
                nonce=st.nonce,
                resource_fields=[desired[n].any_field for n in sorted(desired)],
            )
            self.cache.record_push(self.node_id, rtype, len(data))
            out.append(data)
        return out

    def settled(self, rtype: ResourceType, snap: Snapshot) -> bool:
        st = self.types.get(rtype)
        if st is None:
            return True
        return st.pending and st.sent_key == self._selection(rtype, st, snap)[1]
