"""An immutable set of resources for one proxy, serialised once, checked before it is published.

A :class:`Snapshot` holds every resource a proxy should have, per type, each encoded exactly once:
the ADS server concatenates the cached bytes into responses, so adding a stream costs no
serialisation. Each resource's version is a hash of its bytes (the delta protocol's per-resource
version); each type's version is a hash over that type's resources, so an unchanged type keeps its
version across snapshots (and across control-plane restarts) and is not re-pushed. The snapshot's
``label`` is for people: logs and ``legation status``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from google.protobuf.message import Message

from legation.errors import LegationError
from legation.xds import _wire
from legation.xds.types import ResourceType

_HCM_URL = "type.googleapis.com/" + hcm_pb2.HttpConnectionManager.DESCRIPTOR.full_name


class SnapshotError(LegationError):
    code = "invalid_snapshot"


class InconsistentSnapshot(SnapshotError):
    """A cluster or listener references an endpoint set or route configuration that is missing."""

    code = "inconsistent_snapshot"


@dataclass(frozen=True, slots=True)
class Resource:
    """One resource, encoded once. ``version`` is a hash of ``data``."""

    type: ResourceType
    name: str
    message: Message
    data: bytes
    version: str
    any_field: bytes = field(repr=False)  # DiscoveryResponse.resources entry, ready to concatenate
    delta_field: bytes = field(repr=False)  # DeltaDiscoveryResponse.resources entry

    @classmethod
    def of(cls, rtype: ResourceType, message: Any) -> Resource:
        msg = _as_protobuf(rtype, message)
        data = msg.SerializeToString(deterministic=True)
        version = hashlib.blake2b(data, digest_size=8).hexdigest()
        name = rtype.name_of(msg)
        if not name:
            raise SnapshotError(f"{rtype.short}: a {rtype.message_class.__name__} has no name")
        return cls(
            type=rtype,
            name=name,
            message=msg,
            data=data,
            version=version,
            any_field=_wire.any_field(2, rtype.type_url, data),
            delta_field=_wire.delta_resource_field(name, version, rtype.type_url, data),
        )


def _as_protobuf(rtype: ResourceType, message: Any) -> Message:
    """Accept an xds-protos message, or an envoy-data-plane (betterproto2) one via ``bytes()``."""
    cls = rtype.message_class
    if isinstance(message, cls):
        return message
    if isinstance(message, Message):
        raise SnapshotError(
            f"{rtype.short}: expected {cls.DESCRIPTOR.full_name}, got "
            f"{message.DESCRIPTOR.full_name}"
        )
    try:
        data = bytes(message)
    except TypeError:
        raise SnapshotError(
            f"{rtype.short}: {type(message).__name__} is neither an xds-protos message nor an "
            "envoy-data-plane message"
        ) from None
    return cls.FromString(data)


class Snapshot:
    """Resources per type for one proxy. Construct with keyword lists of messages."""

    def __init__(
        self,
        version: str = "",
        *,
        clusters: Iterable[Any] = (),
        endpoints: Iterable[Any] = (),
        listeners: Iterable[Any] = (),
        routes: Iterable[Any] = (),
        secrets: Iterable[Any] = (),
    ) -> None:
        self.label = version
        given = {
            ResourceType.CLUSTER: clusters,
            ResourceType.ENDPOINT: endpoints,
            ResourceType.LISTENER: listeners,
            ResourceType.ROUTE: routes,
            ResourceType.SECRET: secrets,
        }
        self._resources: dict[ResourceType, dict[str, Resource]] = {}
        self._versions: dict[ResourceType, str] = {}
        self._diffs: dict[ResourceType, tuple[Snapshot, tuple[frozenset[str], frozenset[str]]]] = {}
        for rtype, messages in given.items():
            by_name: dict[str, Resource] = {}
            for message in messages:
                res = Resource.of(rtype, message)
                if res.name in by_name:
                    raise SnapshotError(f"{rtype.short}: duplicate resource name {res.name!r}")
                by_name[res.name] = res
            self._resources[rtype] = by_name
            digest = hashlib.blake2b(digest_size=6)
            for name in sorted(by_name):
                digest.update(name.encode() + b"\0" + by_name[name].version.encode() + b"\0")
            self._versions[rtype] = digest.hexdigest()

    def diff(self, older: Snapshot, rtype: ResourceType) -> tuple[frozenset[str], frozenset[str]]:
        """Names of ``rtype`` added or changed since ``older``, and names gone. Computed once per
        pair and shared by every stream moving from ``older`` to this snapshot."""
        memo = self._diffs.get(rtype)
        if memo is not None and memo[0] is older:
            return memo[1]
        new, old = self._resources[rtype], older._resources[rtype]
        changed = frozenset(
            n for n, r in new.items() if (o := old.get(n)) is None or o.version != r.version
        )
        result = (changed, frozenset(old.keys() - new.keys()))
        self._diffs[rtype] = (older, result)
        return result

    def without_secrets(self) -> Snapshot:
        """This snapshot minus its SDS secrets (what a node served by its cluster's snapshot
        gets: keys are per proxy, never shared through a fleet's snapshot)."""
        if not self._resources[ResourceType.SECRET]:
            return self
        out = Snapshot(self.label)
        out._resources = {**self._resources, ResourceType.SECRET: {}}
        out._versions = {**self._versions, ResourceType.SECRET: out._versions[ResourceType.SECRET]}
        return out

    def resources(self, rtype: ResourceType) -> Mapping[str, Resource]:
        return self._resources[rtype]

    def version(self, rtype: ResourceType) -> str:
        return self._versions[rtype]

    def __len__(self) -> int:
        return sum(len(r) for r in self._resources.values())

    def eds_names(self) -> set[str]:
        """EDS names that CDS references (clusters of type EDS)."""
        names = set()
        for res in self._resources[ResourceType.CLUSTER].values():
            c: cluster_pb2.Cluster = res.message
            if c.type == cluster_pb2.Cluster.EDS:
                names.add(c.eds_cluster_config.service_name or c.name)
        return names

    def rds_names(self) -> set[str]:
        """RDS names that LDS references (HTTP connection managers configured with ``rds``)."""
        names = set()
        for res in self._resources[ResourceType.LISTENER].values():
            for hcm in _connection_managers(res.message):
                if hcm.HasField("rds"):
                    names.add(hcm.rds.route_config_name)
        return names

    def check_consistent(self) -> None:
        """Raise :class:`InconsistentSnapshot` naming every missing EDS or RDS resource."""
        problems = []
        missing_eds = self.eds_names() - set(self._resources[ResourceType.ENDPOINT])
        if missing_eds:
            problems.append(
                "clusters reference missing endpoints (EDS): " + ", ".join(sorted(missing_eds))
            )
        missing_rds = self.rds_names() - set(self._resources[ResourceType.ROUTE])
        if missing_rds:
            problems.append(
                "listeners reference missing route configurations (RDS): "
                + ", ".join(sorted(missing_rds))
            )
        if problems:
            label = f"snapshot {self.label!r}: " if self.label else "snapshot: "
            raise InconsistentSnapshot(label + "; ".join(problems))


def _connection_managers(
    listener: listener_pb2.Listener,
) -> Iterable[hcm_pb2.HttpConnectionManager]:
    chains = list(listener.filter_chains)
    if listener.HasField("default_filter_chain"):
        chains.append(listener.default_filter_chain)
    for chain in chains:
        for f in chain.filters:
            if f.typed_config.type_url == _HCM_URL:
                hcm = hcm_pb2.HttpConnectionManager()
                f.typed_config.Unpack(hcm)
                yield hcm
