"""Mesh -> Envoy resources: one :class:`~legation.xds.snapshot.Snapshot` per proxy.

Pure and deterministic: the same mesh and version give byte-identical snapshots, and every
snapshot passes ``check_consistent()``. Clusters use EDS and connection managers use RDS, both
over the proxy's ADS stream, so an endpoint change is an EDS-only update and a route change an
RDS-only one.

Per proxy (see :meth:`legation.config.Mesh.proxies` for node ids):

* sidecar of an instance of service S: listener ``inbound`` (the instance's ``inbound_port``) with
  route configuration ``inbound`` forwarding everything to cluster ``inbound|S`` (the local app;
  S's local rate limit is enforced here), or a TCP proxy for tcp services; listener ``outbound``
  (``outbound_port``) with route configuration ``outbound``: a virtual host per HTTP service,
  matched by Host (``name`` or ``name:port``), holding the routes whose ``mesh_hosts`` list it
  and then a default route to the whole service;
* the ingress gateway: listener ``gateway`` with route configuration ``gateway``: one virtual
  host (any Host) with the routes that apply on the gateway, in order;
* every proxy gets every service's clusters (``outbound|S`` and ``outbound|S|subset``).

When the mesh declares request-path services (``extauthz``, ``extproc``, ``ratelimit``), the
gateway and the sidecars' outbound listeners get their filters, every proxy gets their clusters
(``legation|extauthz``, ``legation|extproc``, ``legation|ratelimit``), and every route in the
``gateway`` and ``outbound`` route configurations says what each does there (routes' ``authz``,
``filters``, ``rate_limits``); see :mod:`legation.translate._services`. The ``inbound``
listener carries none of them: the caller's side already applied the route. With ``accesslog``,
every connection manager (inbound too) gets access logs; see :mod:`legation.translate._accesslog`.

When the mesh turns ``mtls`` on, sidecar inbound listeners terminate mTLS and the clusters to
sidecars originate it, with the certificates of the ``secrets`` given (SDS over ADS); see
:mod:`legation.translate._mtls`.

When the mesh has a ``capture`` block, sidecars live in their pods and their listeners, endpoints
and service clusters change accordingly; see :mod:`legation.translate._capture`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.config.route.v3 import route_pb2
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2

from legation.certs.spiffe import spiffe_id
from legation.config.model import Endpoint, Mesh, Service
from legation.config.proxies import gateway_node_id, sidecar_node_id
from legation.config.routes import Route
from legation.extproc.config import Chains
from legation.translate._accesslog import access_logs
from legation.translate._capture import (
    ANY_HOST,
    LOOPBACK,
    bridged,
    capture_outbound,
    passthrough_cluster,
    service_domains,
    to_bridge,
)
from legation.translate._clusters import inbound_local_app, outbound_clusters
from legation.translate._listeners import http_listener, tcp_listener
from legation.translate._mtls import check_sds, secure_inbound
from legation.translate._names import (
    GATEWAY,
    INBOUND,
    OUTBOUND,
    inbound_cluster,
)
from legation.translate._routes import default_route, inbound_routes, route
from legation.translate._routing_groups import owned_headers
from legation.translate._services import apply_services, service_clusters, service_filters
from legation.translate._stats import route_stat_prefix
from legation.translate._tracing import hcm_tracing, route_tracing, tracing_clusters
from legation.xds.snapshot import Snapshot

__all__ = ["translate"]

_Clusters = list[tuple[cluster_pb2.Cluster, endpoint_pb2.ClusterLoadAssignment]]


Secrets = Mapping[str, Sequence[secret_pb2.Secret]]


def translate(mesh: Mesh, *, version: str, secrets: Secrets | None = None) -> dict[str, Snapshot]:
    """A consistent snapshot per proxy node id, labelled ``version``.

    ``secrets``: node id -> its SDS secrets (:meth:`legation.certs.MeshIssuer.secrets`), put in
    that proxy's snapshot; with them, every secret a listener or cluster names must be there.
    Without them an mTLS mesh translates to snapshots that name secrets they do not carry: good
    for checking a mesh, not for serving it."""
    from legation.services import route_chains  # plugin instances: only their phases are read

    shared: _Clusters = [
        pair
        for s in mesh.services
        for pair in outbound_clusters(s, server_id=_identity(mesh, s), capture=mesh.capture)
    ]
    routed = _Routed(mesh, route_chains(mesh))
    in_pods = shared if mesh.capture is None else bridged(shared, mesh.capture)
    out: dict[str, Snapshot] = {}
    for service in mesh.services:
        for i, endpoint in enumerate(service.endpoints):
            if endpoint.sidecar is not None:
                node = sidecar_node_id(service.instance_name(i))
                out[node] = _sidecar(
                    routed, node, service, endpoint, in_pods, version, _secrets_of(secrets, node)
                )
    if mesh.gateway is not None:
        node = gateway_node_id(mesh.gateway.name)
        out[node] = _gateway(routed, node, shared, version, _secrets_of(secrets, node))
    for snapshot in out.values():
        snapshot.check_consistent()
        if secrets is not None:
            check_sds(snapshot)
    return out


def _identity(mesh: Mesh, service: Service) -> str | None:
    """The service's SPIFFE id when the mesh uses mTLS (see :mod:`legation.certs.spiffe`)."""
    m = mesh.mtls
    return spiffe_id(m.trust_domain, m.namespace, service.name) if m.enabled else None


def _secrets_of(secrets: Secrets | None, node: str) -> Sequence[secret_pb2.Secret]:
    return () if secrets is None else secrets.get(node, ())


class _Routed:
    """The mesh with what its routes need from the request-path services."""

    def __init__(self, mesh: Mesh, chains: Chains) -> None:
        self.mesh = mesh
        self.chains = chains
        self.filters = service_filters(mesh)
        self.clusters = [*service_clusters(mesh), *tracing_clusters(mesh)]
        # a captured sidecar reaches the services through the bridge, and may pass through
        cap = mesh.capture
        self.sidecar_clusters = (
            self.clusters
            if cap is None
            else [*to_bridge(self.clusters, cap), passthrough_cluster()]
        )
        self._index = {r.name: i for i, r in enumerate(mesh.routes)}

    def route(self, spec: Route) -> rc.Route:
        out = route(self.mesh, spec)
        index = self._index[spec.name]
        out.stat_prefix = route_stat_prefix(index, spec.name)
        apply_services(self.mesh, out, spec, self.chains, index=index)
        route_tracing(out, spec)
        return out

    def default_route(self, service: Service) -> rc.Route:
        out = default_route(service)
        apply_services(self.mesh, out, None, self.chains)
        return out


def _snapshot(
    routed: _Routed,
    version: str,
    clusters: _Clusters,
    listeners: list[listener_pb2.Listener],
    routes: list[route_pb2.RouteConfiguration],
    secrets: Sequence[secret_pb2.Secret],
    *,
    sidecar: bool = False,
) -> Snapshot:
    services = routed.sidecar_clusters if sidecar else routed.clusters
    return Snapshot(
        version,
        clusters=[*(c for c, _ in clusters), *services],
        endpoints=[e for _, e in clusters],
        listeners=listeners,
        routes=routes,
        secrets=secrets,
    )


def _gateway(
    routed: _Routed,
    node: str,
    shared: _Clusters,
    version: str,
    secrets: Sequence[secret_pb2.Secret],
) -> Snapshot:
    mesh = routed.mesh
    gw = mesh.gateway
    assert gw is not None
    routes = route_pb2.RouteConfiguration(
        name=GATEWAY,
        virtual_hosts=[
            rc.VirtualHost(
                name=gw.name,
                domains=["*"],
                routes=[routed.route(r) for r in mesh.routes if r.on_gateway],
            )
        ],
    )
    listener = http_listener(
        GATEWAY,
        gw.host,
        gw.port,
        route_config=GATEWAY,
        stat_prefix=f"gateway_{gw.name}",
        edge=True,
        service_filters=routed.filters,
        path_normalization=routed.mesh.path_normalization,
        tracing=hcm_tracing(mesh, service_name=gw.name),
        access_logs=access_logs(mesh, node, GATEWAY),
        strip_headers=owned_headers(mesh.routes),
    )
    return _snapshot(routed, version, shared, [listener], [routes], secrets)


def _sidecar(
    routed: _Routed,
    node: str,
    service: Service,
    endpoint: Endpoint,
    shared: _Clusters,
    version: str,
    secrets: Sequence[secret_pb2.Secret],
) -> Snapshot:
    sidecar = endpoint.sidecar
    assert sidecar is not None
    cap = routed.mesh.capture
    # captured: redirected connections arrive at the pod's address; the app is on its loopback
    host = endpoint.host if cap is None else ANY_HOST
    local = inbound_local_app(
        service, endpoint if cap is None else endpoint.model_copy(update={"host": LOOPBACK})
    )
    listeners: list[listener_pb2.Listener] = []
    routes: list[route_pb2.RouteConfiguration] = []
    if service.protocol == "tcp":
        listeners.append(
            tcp_listener(
                INBOUND,
                host,
                sidecar.inbound_port,
                cluster=inbound_cluster(service.name),
                stat_prefix=f"inbound_{service.name}",
            )
        )
    else:
        listeners.append(
            http_listener(
                INBOUND,
                host,
                sidecar.inbound_port,
                route_config=INBOUND,
                stat_prefix=f"inbound_{service.name}",
                path_normalization=routed.mesh.path_normalization,
                tracing=hcm_tracing(routed.mesh, service_name=service.name),
                access_logs=access_logs(routed.mesh, node, INBOUND),
            )
        )
        routes.append(inbound_routes(service))
    if routed.mesh.mtls.enabled:
        secure_inbound(
            listeners[0],
            permissive=routed.mesh.mtls.mode == "permissive",
            trust_domain=routed.mesh.mtls.trust_domain,
        )
    outbound = http_listener(
        OUTBOUND,
        endpoint.host,
        sidecar.outbound_port,
        route_config=OUTBOUND,
        stat_prefix=f"outbound_{service.name}",
        edge=True,  # the app is the client: its own X-Forwarded-For never names the address
        service_filters=routed.filters,
        path_normalization=routed.mesh.path_normalization,
        tracing=hcm_tracing(routed.mesh, service_name=service.name),
        access_logs=access_logs(routed.mesh, node, OUTBOUND),
        strip_headers=owned_headers(routed.mesh.routes),
    )
    if cap is not None:
        outbound = capture_outbound(outbound, routed.mesh, cap, sidecar.outbound_port)
    listeners.append(outbound)
    routes.append(_outbound_routes(routed))
    return _snapshot(routed, version, [*shared, local], listeners, routes, secrets, sidecar=True)


def _outbound_routes(routed: _Routed) -> route_pb2.RouteConfiguration:
    hosts = []
    for service in routed.mesh.services:
        if service.protocol == "tcp":
            continue
        own = [routed.route(r) for r in routed.mesh.routes if service.name in r.mesh_hosts]
        hosts.append(
            rc.VirtualHost(
                name=service.name,
                domains=service_domains(routed.mesh.capture, service),
                routes=[*own, routed.default_route(service)],
            )
        )
    return route_pb2.RouteConfiguration(name=OUTBOUND, virtual_hosts=hosts)
