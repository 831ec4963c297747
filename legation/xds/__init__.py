"""The xDS protocol: resource types, snapshots, the snapshot cache, the ADS server and a client.

This package knows Envoy's discovery protocol and nothing of the mesh: it imports no domain
package (``legation.config``, ``legation.certs``, the request-path services), which a test
enforces. What to serve comes from :mod:`legation.translate` as :class:`Snapshot` objects; who may
connect is decided by the :class:`Authenticator` the server is given (the mesh's is
:class:`legation.certs.xds_auth.XdsAuth`).

* :mod:`~legation.xds.types`: type URLs, and the ADS send order as an enum;
* :mod:`~legation.xds.snapshot`: one node's resources, encoded once, checked before publish;
* :mod:`~legation.xds.cache`: snapshots per node, debounced pushes, ACK/NACK status;
* :mod:`~legation.xds.server`: the gRPC facade (ADS SotW and delta, per-type services, fetch);
  the streams themselves are ``_sotw``, ``_delta`` and ``_stream``, the wire helpers ``_wire``;
* :mod:`~legation.xds.auth`: the :class:`Authenticator` protocol and refusals;
* :mod:`~legation.xds.client`: an ADS client that subscribes, follows and ACKs as Envoy does;
* :mod:`~legation.xds.metrics`: the server's Prometheus metrics.
"""

from legation.xds.auth import Authenticator, Refused, channel_credentials
from legation.xds.cache import NodeStatus, SnapshotCache
from legation.xds.client import AdsClient
from legation.xds.metrics import XdsMetrics
from legation.xds.server import XdsServer
from legation.xds.snapshot import InconsistentSnapshot, Resource, Snapshot, SnapshotError
from legation.xds.types import SEND_ORDER, ResourceType, removal_order

__all__ = [
    "SEND_ORDER",
    "AdsClient",
    "Authenticator",
    "InconsistentSnapshot",
    "NodeStatus",
    "Refused",
    "Resource",
    "ResourceType",
    "Snapshot",
    "SnapshotCache",
    "SnapshotError",
    "XdsMetrics",
    "XdsServer",
    "channel_credentials",
    "removal_order",
]
