"""A snapshot inlined into a static Envoy bootstrap: no control plane needed.

EDS clusters become STATIC clusters carrying their ClusterLoadAssignment, connection managers
that use RDS get their route configuration inline, and SDS secrets become static secrets (the
transport sockets then name them without an ``sds_config``). Useful to try a translated mesh
with a plain ``envoy -c``, to debug a snapshot, and in tests that check the generated config
against the real Envoy without the xDS server.
"""

from __future__ import annotations

import json
from typing import Any

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from google.protobuf import json_format
from google.protobuf.message import Message

from legation._proto import pack
from legation.xds.snapshot import Snapshot, SnapshotError
from legation.xds.types import ResourceType


def static_bootstrap(
    snapshot: Snapshot,
    *,
    node_id: str,
    node_cluster: str = "",
    admin_port: int,
    admin_host: str = "127.0.0.1",
) -> dict[str, Any]:
    """An Envoy v3 bootstrap dict with every resource of ``snapshot`` inlined."""
    snapshot.check_consistent()
    endpoints = snapshot.resources(ResourceType.ENDPOINT)
    routes = snapshot.resources(ResourceType.ROUTE)
    clusters = []
    for res in snapshot.resources(ResourceType.CLUSTER).values():
        cluster = cluster_pb2.Cluster()
        cluster.CopyFrom(res.message)
        if cluster.type == cluster_pb2.Cluster.EDS:
            eds_name = cluster.eds_cluster_config.service_name or cluster.name
            cluster.ClearField("eds_cluster_config")
            cluster.type = cluster_pb2.Cluster.STATIC
            cluster.load_assignment.CopyFrom(endpoints[eds_name].message)
        clusters.append(_as_dict(cluster))
    listeners = []
    for res in snapshot.resources(ResourceType.LISTENER).values():
        listener = listener_pb2.Listener()
        listener.CopyFrom(res.message)
        for chain in listener.filter_chains:
            for f in chain.filters:
                if f.typed_config.Is(hcm_pb2.HttpConnectionManager.DESCRIPTOR):
                    hcm = hcm_pb2.HttpConnectionManager()
                    f.typed_config.Unpack(hcm)
                    if hcm.HasField("rds"):
                        name = hcm.rds.route_config_name
                        if name not in routes:
                            raise SnapshotError(f"RDS: missing route configuration {name!r}")
                        hcm.route_config.CopyFrom(routes[name].message)
                    f.typed_config.CopyFrom(pack(hcm))
        listeners.append(_as_dict(listener))
    secrets = [_as_dict(res.message) for res in snapshot.resources(ResourceType.SECRET).values()]
    static: dict[str, Any] = {
        "clusters": _static_sds(clusters),
        "listeners": _static_sds(listeners),
    }
    if secrets:
        static["secrets"] = secrets
    return {
        "node": {"id": node_id, "cluster": node_cluster or node_id},
        "admin": {"address": {"socket_address": {"address": admin_host, "port_value": admin_port}}},
        "static_resources": static,
    }


_SDS_REFS = ("tls_certificate_sds_secret_configs", "validation_context_sds_secret_config")


def _static_sds(value: Any) -> Any:
    """Drop ``sds_config`` from SDS secret references: a bare name refers to a static secret."""
    if isinstance(value, list):
        return [_static_sds(v) for v in value]
    if not isinstance(value, dict):
        return value
    out = {}
    for key, item in value.items():
        if key in _SDS_REFS:
            refs = item if isinstance(item, list) else [item]
            stripped = [{k: v for k, v in ref.items() if k != "sds_config"} for ref in refs]
            out[key] = stripped if isinstance(item, list) else stripped[0]
        else:
            out[key] = _static_sds(item)
    return out


def _as_dict(message: Message) -> dict[str, Any]:
    """Plain dicts (json_format nests OrderedDicts for Any, which YAML dumpers refuse)."""
    return json.loads(json_format.MessageToJson(message, preserving_proto_field_name=True))  # type: ignore[no-any-return]
