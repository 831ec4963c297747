"""xDS resource types: type URLs, message classes, names, and the ADS send order.

The order of :class:`ResourceType` *is* the make-before-break send order on an ADS stream:
clusters, then their endpoints, then the listeners and routes that use them, then secrets.
Removals go the other way round (see :func:`removal_order`).
"""

from __future__ import annotations

import enum
from typing import Any

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from google.protobuf.message import Message

_PREFIX = "type.googleapis.com/"


class ResourceType(enum.IntEnum):
    """A resource type. The integer order is the ADS send order (CDS, EDS, LDS, RDS, SDS)."""

    CLUSTER = 0
    ENDPOINT = 1
    LISTENER = 2
    ROUTE = 3
    SECRET = 4

    @property
    def message_class(self) -> type[Message]:
        return _CLASSES[self]

    @property
    def type_url(self) -> str:
        return _PREFIX + str(self.message_class.DESCRIPTOR.full_name)

    @property
    def short(self) -> str:
        """The conventional abbreviation: CDS, EDS, LDS, RDS, SDS."""
        return _SHORT[self]

    @property
    def wildcard_by_default(self) -> bool:
        """CDS and LDS subscribe to everything by default; EDS, RDS and SDS ask by name."""
        return self in (ResourceType.CLUSTER, ResourceType.LISTENER)

    @classmethod
    def from_url(cls, type_url: str) -> ResourceType:
        try:
            return _BY_URL[type_url]
        except KeyError:
            raise ValueError(f"unsupported xDS type URL {type_url!r}") from None

    def name_of(self, resource: Any) -> str:
        """The name a resource is known by on the wire."""
        if self is ResourceType.ENDPOINT:
            return str(resource.cluster_name)
        return str(resource.name)


_CLASSES: dict[ResourceType, type[Message]] = {
    ResourceType.CLUSTER: cluster_pb2.Cluster,
    ResourceType.ENDPOINT: endpoint_pb2.ClusterLoadAssignment,
    ResourceType.LISTENER: listener_pb2.Listener,
    ResourceType.ROUTE: route_pb2.RouteConfiguration,
    ResourceType.SECRET: secret_pb2.Secret,
}
_SHORT = {
    ResourceType.CLUSTER: "CDS",
    ResourceType.ENDPOINT: "EDS",
    ResourceType.LISTENER: "LDS",
    ResourceType.ROUTE: "RDS",
    ResourceType.SECRET: "SDS",
}
_BY_URL = {t.type_url: t for t in ResourceType}

SEND_ORDER: tuple[ResourceType, ...] = tuple(sorted(ResourceType))


def removal_order() -> tuple[ResourceType, ...]:
    """Break after make: listeners and routes stop using a cluster before it goes away."""
    return (
        ResourceType.LISTENER,
        ResourceType.ROUTE,
        ResourceType.CLUSTER,
        ResourceType.ENDPOINT,
        ResourceType.SECRET,
    )
