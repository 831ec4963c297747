"""translate() with a ``capture`` block: pods' endpoints, the original-destination outbound
listener, services over the bridge; the explicit listeners stay for meshes without one."""

from __future__ import annotations

from typing import Any

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.listener.v3 import listener_pb2

from legation.config.capture import Capture
from legation.translate import relay_targets, translate
from legation.xds.snapshot import Snapshot
from legation.xds.types import ResourceType
from tests.config.meshdata import base, parse

RANGE = "10.77.0.0/16"


def captured(**block: Any) -> tuple[dict[str, Snapshot], Capture]:
    data = base()
    data["capture"] = {"cidr": RANGE, **block}
    data["extauthz"] = {"port": 18010, "embedded": False}
    mesh = parse(data)
    assert mesh.capture is not None
    return translate(mesh, version="v1"), mesh.capture


def message(snap: Snapshot, rtype: ResourceType, name: str) -> Any:
    return snap.resources(rtype)[name].message


def _endpoints(snap: Snapshot, name: str) -> list[tuple[str, int]]:
    cla = message(snap, ResourceType.ENDPOINT, name)
    return [
        (lb.endpoint.address.socket_address.address, lb.endpoint.address.socket_address.port_value)
        for group in cla.endpoints
        for lb in group.lb_endpoints
    ]


def test_sidecar_endpoints_are_the_pods_app_ports() -> None:
    snaps, cap = captured()
    gw = snaps["gateway-ingress"]
    assert _endpoints(gw, "outbound|reviews") == [
        (cap.instance_ip("reviews-0"), 9111),
        (cap.instance_ip("reviews-1"), 9112),
    ]
    assert _endpoints(gw, "outbound|ratings") == [("127.0.0.1", 9121)]  # no sidecar, no pod


def test_an_app_port_excluded_from_capture_is_reached_at_the_inbound_port() -> None:
    snaps, cap = captured(inbound={"exclude_ports": [9111]})
    assert _endpoints(snaps["gateway-ingress"], "outbound|reviews")[0] == (
        cap.instance_ip("reviews-0"),
        15111,
    )


def test_inbound_listens_on_the_pod_and_forwards_to_its_loopback() -> None:
    snaps, _ = captured()
    sidecar = snaps["sidecar-reviews-0"]
    inbound: listener_pb2.Listener = message(sidecar, ResourceType.LISTENER, "inbound")
    assert inbound.address.socket_address.address == "0.0.0.0"
    assert _endpoints(sidecar, "inbound|reviews") == [("127.0.0.1", 9111)]


def test_outbound_reads_the_original_destination_with_a_chain_per_service() -> None:
    snaps, cap = captured()
    out: listener_pb2.Listener = message(
        snaps["sidecar-reviews-0"], ResourceType.LISTENER, "outbound"
    )
    assert out.address.socket_address.address == "127.0.0.1"
    assert [f.name for f in out.listener_filters] == ["envoy.filters.listener.original_dst"]
    chains = {
        c.name: (
            c.filter_chain_match.prefix_ranges[0].address_prefix,
            c.filter_chain_match.destination_port.value,
        )
        for c in out.filter_chains
    }
    assert chains == {
        "explicit": ("127.0.0.1", 15211),
        "service/reviews": (cap.service_ip("reviews"), 9080),
        "service/ratings": (cap.service_ip("ratings"), 9080),
    }
    assert out.default_filter_chain.name == "passthrough"
    routes = message(snaps["sidecar-reviews-0"], ResourceType.ROUTE, "outbound")
    reviews = next(v for v in routes.virtual_hosts if v.name == "reviews")
    vip = cap.service_ip("reviews")
    assert list(reviews.domains) == ["reviews", "reviews:9080", vip, f"{vip}:9080"]


def test_registry_only_has_no_pass_through() -> None:
    snaps, _ = captured(outbound={"policy": "registry_only"})
    out = message(snaps["sidecar-reviews-0"], ResourceType.LISTENER, "outbound")
    assert not out.HasField("default_filter_chain")


def test_sidecars_reach_the_services_over_the_bridge_and_the_gateway_over_loopback() -> None:
    snaps, cap = captured()

    def address(snap: Snapshot) -> str:
        cluster: cluster_pb2.Cluster = message(snap, ResourceType.CLUSTER, "legation|extauthz")
        lb = cluster.load_assignment.endpoints[0].lb_endpoints[0]
        return str(lb.endpoint.address.socket_address.address)

    assert address(snaps["sidecar-reviews-0"]) == cap.bridge_ip == "10.77.0.1"
    assert address(snaps["gateway-ingress"]) == "127.0.0.1"
    passthrough = message(snaps["sidecar-reviews-0"], ResourceType.CLUSTER, "passthrough")
    assert passthrough.type == cluster_pb2.Cluster.ORIGINAL_DST
    assert "passthrough" not in snaps["gateway-ingress"].resources(ResourceType.CLUSTER)


def test_relay_targets_are_the_xds_server_the_services_and_instances_without_pods() -> None:
    data = base()
    data["extauthz"] = {"port": 18010, "embedded": False}
    assert relay_targets(parse(data)) == [
        ("127.0.0.1", 9121),  # ratings-0: no sidecar, so no pod: it stays on the host
        ("127.0.0.1", 18000),
        ("127.0.0.1", 18010),
    ]


def test_pods_reach_an_instance_without_a_pod_through_the_bridge() -> None:
    snaps, cap = captured()
    assert _endpoints(snaps["sidecar-reviews-0"], "outbound|ratings") == [(cap.bridge_ip, 9121)]
    assert _endpoints(snaps["gateway-ingress"], "outbound|ratings") == [("127.0.0.1", 9121)]


def test_without_capture_the_listeners_are_the_explicit_ones() -> None:
    snaps = translate(parse(base()), version="v1")
    out = message(snaps["sidecar-reviews-0"], ResourceType.LISTENER, "outbound")
    assert not out.listener_filters and len(out.filter_chains) == 1
    assert out.address.socket_address.address == "127.0.0.1"
