from __future__ import annotations

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy_data_plane.envoy.config.cluster import v3 as dp_cluster

from legation.xds.snapshot import InconsistentSnapshot, Snapshot, SnapshotError
from legation.xds.types import SEND_ORDER, ResourceType, removal_order
from tests.xds.envoy_resources import cluster, endpoints, listener, routes, services_snapshot


def test_send_order_is_cds_eds_lds_rds_sds() -> None:
    assert [t.short for t in SEND_ORDER] == ["CDS", "EDS", "LDS", "RDS", "SDS"]
    assert removal_order()[:2] == (ResourceType.LISTENER, ResourceType.ROUTE)


def test_consistency_error_names_every_missing_resource() -> None:
    snap = Snapshot(
        "v7",
        clusters=[cluster("a"), cluster("b")],
        endpoints=[endpoints("a", 1)],
        listeners=[listener("l", 1, "missing-routes")],
    )
    with pytest.raises(InconsistentSnapshot) as err:
        snap.check_consistent()
    assert str(err.value) == (
        "snapshot 'v7': clusters reference missing endpoints (EDS): b; "
        "listeners reference missing route configurations (RDS): missing-routes"
    )


def test_consistent_snapshot_passes_and_reports_references() -> None:
    snap = services_snapshot("v1", 8080, {"a": 1, "b": 2})
    snap.check_consistent()
    assert snap.eds_names() == {"a", "b"}
    assert snap.rds_names() == {"ingress-routes"}


def test_type_versions_follow_content_not_order() -> None:
    one = Snapshot(clusters=[cluster("a"), cluster("b")])
    two = Snapshot(clusters=[cluster("b"), cluster("a")])
    three = Snapshot(clusters=[cluster("a"), cluster("c")])
    assert one.version(ResourceType.CLUSTER) == two.version(ResourceType.CLUSTER)
    assert one.version(ResourceType.CLUSTER) != three.version(ResourceType.CLUSTER)
    assert one.resources(ResourceType.CLUSTER)["a"].version == (
        three.resources(ResourceType.CLUSTER)["a"].version
    )


def test_duplicate_names_are_rejected() -> None:
    with pytest.raises(SnapshotError, match="CDS: duplicate resource name 'a'"):
        Snapshot(clusters=[cluster("a"), cluster("a")])


def test_wrong_message_type_is_rejected() -> None:
    with pytest.raises(SnapshotError, match=r"expected envoy\.config\.cluster\.v3\.Cluster"):
        Snapshot(clusters=[routes("r", {})])


def test_envoy_data_plane_messages_are_accepted_and_encoded_once() -> None:
    dp = dp_cluster.Cluster(name="from-dataclass", connect_timeout=None)
    snap = Snapshot(clusters=[dp])
    res = snap.resources(ResourceType.CLUSTER)["from-dataclass"]
    assert isinstance(res.message, cluster_pb2.Cluster)
    assert res.data == bytes(dp)
