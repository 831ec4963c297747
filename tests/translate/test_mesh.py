"""translate(): per-proxy snapshots, checked against hand-written expected protobufs."""

from __future__ import annotations

from typing import Any

from envoy.config.cluster.v3 import circuit_breaker_pb2, cluster_pb2, outlier_detection_pb2
from envoy.config.core.v3 import address_pb2, base_pb2, config_source_pb2, protocol_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.type.v3 import percent_pb2
from google.protobuf import duration_pb2, wrappers_pb2

from legation.translate import translate
from legation.xds.snapshot import Snapshot
from legation.xds.types import ResourceType
from tests.config.meshdata import base, parse

ADS = config_source_pb2.ConfigSource(
    ads=config_source_pb2.AggregatedConfigSource(), resource_api_version=config_source_pb2.V3
)


def snapshots(data: dict[str, Any] | None = None) -> dict[str, Snapshot]:
    return translate(parse(data or base()), version="v1")


def message(snap: Snapshot, rtype: ResourceType, name: str) -> Any:
    return snap.resources(rtype)[name].message


def cla(name: str, *ports: int) -> endpoint_pb2.ClusterLoadAssignment:
    return endpoint_pb2.ClusterLoadAssignment(
        cluster_name=name,
        endpoints=[
            endpoint_components_pb2.LocalityLbEndpoints(
                lb_endpoints=[
                    endpoint_components_pb2.LbEndpoint(
                        endpoint=endpoint_components_pb2.Endpoint(
                            address=address_pb2.Address(
                                socket_address=address_pb2.SocketAddress(
                                    address="127.0.0.1", port_value=p
                                )
                            )
                        )
                    )
                    for p in ports
                ]
            )
        ],
    )


def hcm_of(listener: listener_pb2.Listener) -> hcm_pb2.HttpConnectionManager:
    hcm = hcm_pb2.HttpConnectionManager()
    listener.filter_chains[0].filters[0].typed_config.Unpack(hcm)
    return hcm


def gateway_routes(snap: Snapshot) -> list[rc.Route]:
    return list(message(snap, ResourceType.ROUTE, "gateway").virtual_hosts[0].routes)


def test_one_snapshot_per_proxy_consistent_and_deterministic() -> None:
    mesh = parse(base())
    first, second = translate(mesh, version="v1"), translate(mesh, version="v1")
    assert sorted(first) == sorted(p.node_id for p in mesh.proxies())
    for node, snap in first.items():
        snap.check_consistent()
        for rtype in ResourceType:
            assert snap.version(rtype) == second[node].version(rtype)
            assert [r.data for r in snap.resources(rtype).values()] == [
                r.data for r in second[node].resources(rtype).values()
            ]


def test_clusters_are_eds_over_ads_and_point_at_sidecar_inbound_ports() -> None:
    gw = snapshots()["gateway-ingress"]
    assert sorted(gw.resources(ResourceType.CLUSTER)) == [
        "outbound|ratings",
        "outbound|reviews",
        "outbound|reviews|v1",
        "outbound|reviews|v2",
    ]
    assert message(gw, ResourceType.CLUSTER, "outbound|reviews|v2") == cluster_pb2.Cluster(
        name="outbound|reviews|v2",
        type=cluster_pb2.Cluster.EDS,
        eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(eds_config=ADS),
        connect_timeout=duration_pb2.Duration(seconds=1),
        lb_policy=cluster_pb2.Cluster.ROUND_ROBIN,
    )
    # reviews instances have sidecars (inbound ports); ratings' instance has none (the app).
    assert message(gw, ResourceType.ENDPOINT, "outbound|reviews") == cla(
        "outbound|reviews", 15111, 15112
    )
    assert message(gw, ResourceType.ENDPOINT, "outbound|reviews|v2") == cla(
        "outbound|reviews|v2", 15112
    )
    assert message(gw, ResourceType.ENDPOINT, "outbound|ratings") == cla("outbound|ratings", 9121)


def test_endpoint_change_is_eds_only() -> None:
    data = base()
    before = snapshots(data)["gateway-ingress"]
    data["services"][1]["endpoints"][0]["port"] = 9122
    after = snapshots(data)["gateway-ingress"]
    changed = {t for t in ResourceType if before.version(t) != after.version(t)}
    assert changed == {ResourceType.ENDPOINT}


def test_service_cluster_policies() -> None:
    data = base()
    data["services"][0].update(
        connect_timeout="250ms",
        load_balancer={"policy": "least_request"},
        circuit_breakers={"max_connections": 10, "max_pending_requests": 5},
        outlier_detection={"consecutive_5xx": 3, "interval": "2s", "base_ejection_time": "10s"},
        retries={"attempts": 2, "budget": {"percent": 25, "min_concurrency": 4}},
    )
    cluster = message(snapshots(data)["gateway-ingress"], ResourceType.CLUSTER, "outbound|reviews")
    assert cluster.connect_timeout == duration_pb2.Duration(nanos=250_000_000)
    assert cluster.lb_policy == cluster_pb2.Cluster.LEAST_REQUEST
    assert cluster.circuit_breakers == circuit_breaker_pb2.CircuitBreakers(
        thresholds=[
            circuit_breaker_pb2.CircuitBreakers.Thresholds(
                priority=base_pb2.DEFAULT,
                max_connections=wrappers_pb2.UInt32Value(value=10),
                max_pending_requests=wrappers_pb2.UInt32Value(value=5),
                retry_budget=circuit_breaker_pb2.CircuitBreakers.Thresholds.RetryBudget(
                    budget_percent=percent_pb2.Percent(value=25),
                    min_retry_concurrency=wrappers_pb2.UInt32Value(value=4),
                ),
            )
        ]
    )
    assert cluster.outlier_detection == outlier_detection_pb2.OutlierDetection(
        consecutive_5xx=wrappers_pb2.UInt32Value(value=3),
        interval=duration_pb2.Duration(seconds=2),
        base_ejection_time=duration_pb2.Duration(seconds=10),
        max_ejection_percent=wrappers_pb2.UInt32Value(value=10),
    )


def test_grpc_service_clusters_speak_http2() -> None:
    data = base()
    data["services"][1]["protocol"] = "grpc"
    cluster = message(snapshots(data)["gateway-ingress"], ResourceType.CLUSTER, "outbound|ratings")
    options = cluster.typed_extension_protocol_options[
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    ]
    assert options.type_url.endswith("HttpProtocolOptions")
    plain = message(snapshots(data)["gateway-ingress"], ResourceType.CLUSTER, "outbound|reviews")
    assert not plain.typed_extension_protocol_options


def test_gateway_listener_uses_rds_with_readable_stats() -> None:
    gw = snapshots()["gateway-ingress"]
    listener = message(gw, ResourceType.LISTENER, "gateway")
    assert listener.address.socket_address.port_value == 8080
    assert listener.stat_prefix == "gateway_ingress"
    hcm = hcm_of(listener)
    assert hcm.stat_prefix == "gateway_ingress"
    assert hcm.rds == hcm_pb2.Rds(config_source=ADS, route_config_name="gateway")
    assert [f.name for f in hcm.http_filters] == [
        "envoy.filters.http.fault",
        "envoy.filters.http.local_ratelimit",
        "envoy.filters.http.router",
    ]
    assert hcm.use_remote_address.value is True
    drop = hcm.common_http_protocol_options.headers_with_underscores_action
    assert drop == protocol_pb2.HttpProtocolOptions.DROP_HEADER


def test_sidecar_outbound_trusts_the_peer_address_not_the_apps_forwarded_for() -> None:
    sidecar = snapshots()["sidecar-reviews-0"]
    outbound = hcm_of(message(sidecar, ResourceType.LISTENER, "outbound"))
    assert outbound.use_remote_address.value is True  # remote_address limits count the app
    drop = outbound.common_http_protocol_options.headers_with_underscores_action
    assert drop == protocol_pb2.HttpProtocolOptions.DROP_HEADER  # x_user never passes for x-user
    inbound = hcm_of(message(sidecar, ResourceType.LISTENER, "inbound"))
    assert not inbound.HasField("use_remote_address")  # the peer is another sidecar


def test_header_match_to_subset() -> None:
    data = base()
    data["routes"] = [
        {
            "name": "v2-by-header",
            "match": {
                "path": {"prefix": "/reviews"},
                "headers": [
                    {"name": "x-version", "exact": "v2"},
                    {"name": "x-debug", "present": True},
                ],
                "query": [{"name": "q", "regex": "^a+$"}],
                "methods": ["GET", "HEAD"],
            },
            "to": {"service": "reviews", "subset": "v2"},
            "timeout": "3s",
        }
    ]
    (route,) = gateway_routes(snapshots(data)["gateway-ingress"])
    expected = rc.Route(name="v2-by-header")
    expected.match.prefix = "/reviews"
    h = expected.match.headers.add(name="x-version")
    h.string_match.exact = "v2"
    expected.match.headers.add(name="x-debug", present_match=True)
    q = expected.match.query_parameters.add(name="q")
    q.string_match.safe_regex.regex = "^a+$"
    m = expected.match.headers.add(name=":method")
    m.string_match.safe_regex.regex = "^(GET|HEAD)$"
    expected.route.cluster = "outbound|reviews|v2"
    expected.route.timeout.seconds = 3
    expected.stat_prefix = "v2-by-header"  # route-level stats, named after the route
    assert route == expected


def test_weighted_split_retries_mirror_and_rewrite() -> None:
    data = base()
    data["routes"] = [
        {
            "name": "canary",
            "match": {"path": {"exact": "/reviews"}},
            "split": [
                {"service": "reviews", "subset": "v1", "weight": 90},
                {"service": "reviews", "subset": "v2", "weight": 10},
            ],
            "retries": {"attempts": 3, "retry_on": ["5xx", "reset"], "per_try_timeout": "500ms"},
            "mirror": {"service": "ratings", "percent": 12.5},
            "rewrite": {"prefix": "/v2/", "host": "reviews.internal"},
        }
    ]
    (route,) = gateway_routes(snapshots(data)["gateway-ingress"])
    expected = rc.RouteAction(
        weighted_clusters=rc.WeightedCluster(
            clusters=[
                rc.WeightedCluster.ClusterWeight(
                    name="outbound|reviews|v1", weight=wrappers_pb2.UInt32Value(value=90)
                ),
                rc.WeightedCluster.ClusterWeight(
                    name="outbound|reviews|v2", weight=wrappers_pb2.UInt32Value(value=10)
                ),
            ]
        ),
        retry_policy=rc.RetryPolicy(
            retry_on="5xx,reset",
            num_retries=wrappers_pb2.UInt32Value(value=3),
            per_try_timeout=duration_pb2.Duration(nanos=500_000_000),
        ),
        request_mirror_policies=[
            rc.RouteAction.RequestMirrorPolicy(
                cluster="outbound|ratings",
                runtime_fraction=base_pb2.RuntimeFractionalPercent(
                    default_value=percent_pb2.FractionalPercent(
                        numerator=125_000, denominator=percent_pb2.FractionalPercent.MILLION
                    )
                ),
            )
        ],
        prefix_rewrite="/v2/",
        host_rewrite_literal="reviews.internal",
    )
    assert route.match == rc.RouteMatch(path="/reviews")
    assert route.route == expected


def test_service_defaults_apply_unless_the_route_overrides() -> None:
    data = base()
    data["services"][0].update(timeout="2s", retries={"attempts": 1})
    data["routes"] = [
        {"name": "plain", "match": {"path": {"prefix": "/a"}}, "to": {"service": "reviews"}},
        {"name": "own", "to": {"service": "reviews"}, "timeout": "5s"},
    ]
    plain, own = gateway_routes(snapshots(data)["gateway-ingress"])
    assert plain.route.timeout.seconds == 2
    assert plain.route.retry_policy.num_retries.value == 1
    assert own.route.timeout.seconds == 5
    assert own.route.retry_policy.num_retries.value == 1


def test_fault_and_local_rate_limit_are_per_route_filter_configs() -> None:
    from envoy.extensions.filters.http.fault.v3 import fault_pb2
    from envoy.extensions.filters.http.local_ratelimit.v3 import local_rate_limit_pb2

    data = base()
    data["routes"] = [
        {
            "name": "faulty",
            "to": {"service": "reviews"},
            "fault": {
                "abort": {"percent": 50, "status": 503},
                "delay": {"percent": 10, "duration": "1s"},
            },
            "local_rate_limit": {"requests": 5, "per": "1s", "burst": 10},
        }
    ]
    (route,) = gateway_routes(snapshots(data)["gateway-ingress"])
    fault = fault_pb2.HTTPFault()
    route.typed_per_filter_config["envoy.filters.http.fault"].Unpack(fault)
    expected = fault_pb2.HTTPFault()
    expected.abort.http_status = 503
    expected.abort.percentage.numerator = 500_000
    expected.abort.percentage.denominator = percent_pb2.FractionalPercent.MILLION
    expected.delay.fixed_delay.seconds = 1
    expected.delay.percentage.numerator = 100_000
    expected.delay.percentage.denominator = percent_pb2.FractionalPercent.MILLION
    assert fault == expected
    limit = local_rate_limit_pb2.LocalRateLimit()
    route.typed_per_filter_config["envoy.filters.http.local_ratelimit"].Unpack(limit)
    assert limit.token_bucket.max_tokens == 10
    assert limit.token_bucket.tokens_per_fill.value == 5
    assert limit.token_bucket.fill_interval.seconds == 1
    assert limit.filter_enforced.default_value.numerator == 100
    assert limit.status.code == 429


def test_redirect_direct_response_and_header_changes() -> None:
    data = base()
    data["routes"] = [
        {
            "name": "old",
            "match": {"path": {"prefix": "/old"}},
            "redirect": {"prefix": "/new", "status": 307, "host": "example.test"},
        },
        {
            "name": "health",
            "match": {"path": {"exact": "/healthz"}},
            "direct_response": {"status": 200, "body": "ok"},
            "headers": {
                "request": {"add": {"x-a": "1"}, "remove": ["x-b"]},
                "response": {"set": {"x-c": "2"}, "remove": ["server"]},
            },
        },
    ]
    old, health = gateway_routes(snapshots(data)["gateway-ingress"])
    assert old.redirect == rc.RedirectAction(
        host_redirect="example.test",
        prefix_rewrite="/new",
        response_code=rc.RedirectAction.TEMPORARY_REDIRECT,
    )
    assert health.direct_response.status == 200
    assert health.direct_response.body.inline_string == "ok"
    assert list(health.request_headers_to_add) == [
        base_pb2.HeaderValueOption(
            header=base_pb2.HeaderValue(key="x-a", value="1"),
            append_action=base_pb2.HeaderValueOption.APPEND_IF_EXISTS_OR_ADD,
        )
    ]
    assert list(health.request_headers_to_remove) == ["x-b"]
    assert health.response_headers_to_add[0].append_action == (
        base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
    )
    assert list(health.response_headers_to_remove) == ["server"]


def test_ring_hash_service_gets_hash_policy_on_its_routes() -> None:
    data = base()
    data["services"][0]["load_balancer"] = {"policy": "ring_hash", "hash_header": "x-user"}
    (route,) = gateway_routes(snapshots(data)["gateway-ingress"])
    assert list(route.route.hash_policy) == [
        rc.RouteAction.HashPolicy(header=rc.RouteAction.HashPolicy.Header(header_name="x-user"))
    ]
    cluster = message(snapshots(data)["gateway-ingress"], ResourceType.CLUSTER, "outbound|reviews")
    assert cluster.lb_policy == cluster_pb2.Cluster.RING_HASH


def test_sidecar_inbound_forwards_to_its_own_app() -> None:
    data = base()
    data["services"][0]["local_rate_limit"] = {"requests": 100, "per": "1s"}
    snap = snapshots(data)["sidecar-reviews-1"]
    assert message(snap, ResourceType.ENDPOINT, "inbound|reviews") == cla("inbound|reviews", 9112)
    inbound = message(snap, ResourceType.LISTENER, "inbound")
    assert inbound.address.socket_address.port_value == 15112
    assert inbound.traffic_direction == base_pb2.INBOUND
    assert hcm_of(inbound).stat_prefix == "inbound_reviews"
    (vhost,) = message(snap, ResourceType.ROUTE, "inbound").virtual_hosts
    (route,) = vhost.routes
    assert route.route == rc.RouteAction(
        cluster="inbound|reviews", timeout=duration_pb2.Duration(seconds=0)
    )
    assert "envoy.filters.http.local_ratelimit" in route.typed_per_filter_config


def test_sidecar_outbound_routes_by_host_with_mesh_routes_first() -> None:
    data = base()
    data["routes"].append(
        {
            "name": "reviews-v2",
            "mesh_hosts": ["reviews"],
            "match": {"headers": [{"name": "x-version", "exact": "v2"}]},
            "to": {"service": "reviews", "subset": "v2"},
        }
    )
    snaps = snapshots(data)
    outbound = message(snaps["sidecar-reviews-0"], ResourceType.LISTENER, "outbound")
    assert outbound.address.socket_address.port_value == 15211
    assert hcm_of(outbound).rds.route_config_name == "outbound"
    config = message(snaps["sidecar-reviews-0"], ResourceType.ROUTE, "outbound")
    hosts = {v.name: v for v in config.virtual_hosts}
    assert list(hosts["reviews"].domains) == ["reviews", "reviews:9080"]
    assert [r.name for r in hosts["reviews"].routes] == ["reviews-v2", "reviews-default"]
    assert [r.name for r in hosts["ratings"].routes] == ["ratings-default"]
    assert hosts["ratings"].routes[0].route.cluster == "outbound|ratings"
    # a mesh-only route is not on the gateway
    assert [r.name for r in gateway_routes(snaps["gateway-ingress"])] == ["reviews"]


def test_tcp_service_inbound_is_a_tcp_proxy_and_has_no_outbound_host() -> None:
    data = base()
    data["services"][0]["protocol"] = "tcp"
    data["routes"][0]["to"] = {"service": "ratings"}
    snap = snapshots(data)["sidecar-reviews-0"]
    inbound = message(snap, ResourceType.LISTENER, "inbound")
    assert inbound.filter_chains[0].filters[0].name == "envoy.filters.network.tcp_proxy"
    assert "inbound" not in snap.resources(ResourceType.ROUTE)
    hosts = [v.name for v in message(snap, ResourceType.ROUTE, "outbound").virtual_hosts]
    assert hosts == ["ratings"]
