"""Builders of small, valid Envoy resources for the xDS tests (not the mesh translation)."""

from __future__ import annotations

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2, config_source_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from google.protobuf import any_pb2, duration_pb2

from legation.xds.snapshot import Snapshot


def _ads() -> config_source_pb2.ConfigSource:
    return config_source_pb2.ConfigSource(
        ads=config_source_pb2.AggregatedConfigSource(),
        resource_api_version=config_source_pb2.V3,
    )


def _addr(port: int, host: str = "127.0.0.1") -> address_pb2.Address:
    return address_pb2.Address(
        socket_address=address_pb2.SocketAddress(address=host, port_value=port)
    )


def cluster(name: str, **kw: object) -> cluster_pb2.Cluster:
    return cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.EDS,
        eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(eds_config=_ads()),
        connect_timeout=duration_pb2.Duration(seconds=1),
        **kw,  # type: ignore[arg-type]
    )


def endpoints(name: str, *ports: int) -> endpoint_pb2.ClusterLoadAssignment:
    return endpoint_pb2.ClusterLoadAssignment(
        cluster_name=name,
        endpoints=[
            endpoint_components_pb2.LocalityLbEndpoints(
                lb_endpoints=[
                    endpoint_components_pb2.LbEndpoint(
                        endpoint=endpoint_components_pb2.Endpoint(address=_addr(p))
                    )
                    for p in ports
                ]
            )
        ],
    )


def listener(name: str, port: int, route_name: str) -> listener_pb2.Listener:
    hcm = hcm_pb2.HttpConnectionManager(
        stat_prefix=name,
        rds=hcm_pb2.Rds(config_source=_ads(), route_config_name=route_name),
        http_filters=[
            hcm_pb2.HttpFilter(
                name="envoy.filters.http.router", typed_config=_pack(router_pb2.Router())
            )
        ],
    )
    return listener_pb2.Listener(
        name=name,
        address=_addr(port),
        filter_chains=[
            listener_components_pb2.FilterChain(
                filters=[
                    listener_components_pb2.Filter(
                        name="envoy.filters.network.http_connection_manager",
                        typed_config=_pack(hcm),
                    )
                ]
            )
        ],
    )


def routes(name: str, prefix_to_cluster: dict[str, str]) -> route_pb2.RouteConfiguration:
    return route_pb2.RouteConfiguration(
        name=name,
        virtual_hosts=[
            route_components_pb2.VirtualHost(
                name=name,
                domains=["*"],
                routes=[
                    route_components_pb2.Route(
                        match=route_components_pb2.RouteMatch(prefix=prefix),
                        route=route_components_pb2.RouteAction(cluster=target),
                    )
                    for prefix, target in sorted(
                        prefix_to_cluster.items(), key=lambda kv: -len(kv[0])
                    )
                ],
            )
        ],
    )


def _pack(msg: object) -> any_pb2.Any:
    a = any_pb2.Any()
    a.Pack(msg)  # type: ignore[arg-type]
    return a


def services_snapshot(version: str, listen_port: int, upstream_ports: dict[str, int]) -> Snapshot:
    """One listener whose routes send ``/<svc>`` to cluster ``<svc>`` at its upstream port."""
    return Snapshot(
        version,
        clusters=[cluster(n) for n in upstream_ports],
        endpoints=[endpoints(n, p) for n, p in upstream_ports.items()],
        listeners=[listener("ingress", listen_port, "ingress-routes")],
        routes=[routes("ingress-routes", {f"/{n}": n for n in upstream_ports})],
    )
