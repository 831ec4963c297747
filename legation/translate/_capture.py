"""What transparent capture changes in the translation (see :mod:`legation.config.capture`).

With a ``capture`` block, each sidecar instance lives in its own network namespace (its "pod",
made by ``legation up``), so:

* a service's endpoints are the pods' addresses at the apps' ports: the destination pod's rules
  redirect that to its sidecar's inbound listener (the gateway and the sidecars call apps as if
  there were no sidecar, as in Istio);
* the inbound listener binds every address of its pod (redirected connections arrive at the pod's
  own address) and forwards to the app on the pod's loopback;
* the outbound listener binds the pod's loopback and reads each connection's original destination
  (``original_dst`` listener filter, ``SO_ORIGINAL_DST``): one filter chain per service, matched
  on its virtual IP and port (the HTTP connection manager of the explicit listener, whose virtual
  hosts also answer to the virtual IP; a TCP proxy for tcp services), one for the explicit use
  (``127.0.0.1:<outbound_port>`` with a Host header still works), and for any other destination
  a pass-through to it (``policy: allow_any``) or nothing, the connection closed
  (``registry_only``);
* the request-path services (and instances without a sidecar, so without a pod) listen on the
  host's loopback, which a pod does not share: a pod's sidecar reaches them at the bridge
  address, where ``legation up`` relays to them.
"""

from __future__ import annotations

from collections.abc import Sequence

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2 as lc
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.listener.original_dst.v3 import original_dst_pb2
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from google.protobuf import duration_pb2, wrappers_pb2

from legation._proto import pack
from legation.config.capture import Capture
from legation.config.model import Endpoint, Mesh, Service
from legation.translate._names import TCP_PROXY_FILTER, outbound_cluster

PASSTHROUGH = "passthrough"
ORIGINAL_DST_FILTER = "envoy.filters.listener.original_dst"
ANY_HOST = "0.0.0.0"
LOOPBACK = "127.0.0.1"


def endpoint_socket(
    capture: Capture | None, service: Service, endpoint: Endpoint
) -> tuple[str, int]:
    """Where the service's clusters reach ``endpoint``: its sidecar's inbound port, or the app
    itself when it has none; with capture, its pod's address at the app's port (redirected to
    the sidecar there), or at the inbound port when the app's port is excluded from capture."""
    sidecar = endpoint.sidecar
    if sidecar is None:
        return endpoint.host, endpoint.port
    if capture is None:
        return endpoint.host, sidecar.inbound_port
    index = next(i for i, e in enumerate(service.endpoints) if e is endpoint)
    ip = capture.instance_ip(service.instance_name(index))
    captured = endpoint.port in capture.inbound_ports(endpoint.port)
    return ip, endpoint.port if captured else sidecar.inbound_port


def service_domains(capture: Capture | None, service: Service) -> list[str]:
    """The Host values a service's outbound virtual host answers to."""
    names = [service.name, f"{service.name}:{service.port}"]
    if capture is not None:
        vip = capture.service_ip(service.name)
        names += [vip, f"{vip}:{service.port}"]
    return names


def to_bridge(
    clusters: Sequence[cluster_pb2.Cluster], capture: Capture
) -> list[cluster_pb2.Cluster]:
    """Copies of the request-path services' static clusters whose loopback addresses are
    replaced by the bridge address (where ``legation up`` relays to the host's loopback)."""
    out = []
    for cluster in clusters:
        copy = cluster_pb2.Cluster()
        copy.CopyFrom(cluster)
        for group in copy.load_assignment.endpoints:
            for lb in group.lb_endpoints:
                sock = lb.endpoint.address.socket_address
                if sock.address in (LOOPBACK, "localhost"):
                    sock.address = capture.bridge_ip
        out.append(copy)
    return out


def relay_targets(mesh: Mesh) -> list[tuple[str, int]]:
    """The host-loopback (host, port) pairs a captured sidecar reaches through the bridge: the
    xDS server, the request-path services' and the trace collector's static clusters, and the
    instances without a sidecar (no pod) on loopback. ``legation up`` relays them."""
    from legation.translate._services import service_clusters
    from legation.translate._tracing import tracing_clusters

    out = [(LOOPBACK, mesh.xds.port)] if mesh.xds.host in (LOOPBACK, "localhost") else []
    for cluster in [*service_clusters(mesh), *tracing_clusters(mesh)]:
        for group in cluster.load_assignment.endpoints:
            for lb in group.lb_endpoints:
                sock = lb.endpoint.address.socket_address
                if sock.address in (LOOPBACK, "localhost"):
                    out.append((LOOPBACK, sock.port_value))
    out += [
        (LOOPBACK, e.port)
        for s in mesh.services
        for e in s.endpoints
        if e.sidecar is None and e.host in (LOOPBACK, "localhost")
    ]
    return sorted(set(out))


def bridged(
    clusters: Sequence[tuple[cluster_pb2.Cluster, endpoint_pb2.ClusterLoadAssignment]],
    capture: Capture,
) -> list[tuple[cluster_pb2.Cluster, endpoint_pb2.ClusterLoadAssignment]]:
    """The services' clusters as a pod's sidecar sees them: endpoints on the host's loopback
    (instances without a sidecar, hence without a pod) at the bridge address instead, where
    ``legation up`` relays them (:func:`relay_targets`)."""
    out = []
    for cluster, cla in clusters:
        copy = endpoint_pb2.ClusterLoadAssignment()
        copy.CopyFrom(cla)
        for group in copy.endpoints:
            for lb in group.lb_endpoints:
                sock = lb.endpoint.address.socket_address
                if sock.address in (LOOPBACK, "localhost"):
                    sock.address = capture.bridge_ip
        out.append((cluster, copy))
    return out


def passthrough_cluster() -> cluster_pb2.Cluster:
    """Connections to where the app meant to go (Istio's PassthroughCluster)."""
    return cluster_pb2.Cluster(
        name=PASSTHROUGH,
        type=cluster_pb2.Cluster.ORIGINAL_DST,
        lb_policy=cluster_pb2.Cluster.CLUSTER_PROVIDED,
        connect_timeout=duration_pb2.Duration(seconds=5),
    )


def capture_outbound(
    explicit: listener_pb2.Listener, mesh: Mesh, capture: Capture, outbound_port: int
) -> listener_pb2.Listener:
    """The outbound listener of a captured pod, built around ``explicit`` (the listener the
    sidecar would have without capture: its connection manager is reused)."""
    hcm_filters = list(explicit.filter_chains[0].filters)
    chains = [_chain("explicit", LOOPBACK, outbound_port, hcm_filters)]
    for service in mesh.services:
        if service.protocol == "tcp":
            filters = [_tcp_proxy(outbound_cluster(service.name), f"outbound_{service.name}")]
        else:
            filters = hcm_filters
        vip = capture.service_ip(service.name)
        chains.append(_chain(f"service/{service.name}", vip, service.port, filters))
    out = listener_pb2.Listener()
    out.CopyFrom(explicit)
    out.address.socket_address.address = LOOPBACK
    del out.filter_chains[:]
    out.filter_chains.extend(chains)
    out.listener_filters.append(
        lc.ListenerFilter(
            name=ORIGINAL_DST_FILTER, typed_config=pack(original_dst_pb2.OriginalDst())
        )
    )
    if capture.outbound.policy == "allow_any":
        out.default_filter_chain.CopyFrom(
            lc.FilterChain(
                name=PASSTHROUGH, filters=[_tcp_proxy(PASSTHROUGH, "outbound_passthrough")]
            )
        )
    return out


def _chain(name: str, ip: str, port: int, filters: Sequence[lc.Filter]) -> lc.FilterChain:
    match = lc.FilterChainMatch(
        destination_port=wrappers_pb2.UInt32Value(value=port),
        prefix_ranges=[
            address_pb2.CidrRange(address_prefix=ip, prefix_len=wrappers_pb2.UInt32Value(value=32))
        ],
    )
    return lc.FilterChain(name=name, filter_chain_match=match, filters=list(filters))


def _tcp_proxy(cluster: str, stat_prefix: str) -> lc.Filter:
    proxy = tcp_proxy_pb2.TcpProxy(stat_prefix=stat_prefix, cluster=cluster)
    return lc.Filter(name=TCP_PROXY_FILTER, typed_config=pack(proxy))
