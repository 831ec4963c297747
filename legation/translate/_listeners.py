"""Listeners: an HTTP connection manager fed by RDS over ADS, or a TCP proxy for tcp services.

Every connection manager carries the same filter chain, fault -> local_ratelimit -> router, with
the first two inert unless a route configures them (per-route config), so listeners do not change
when routes gain or lose a fault or a limit. Connection managers that carry mesh routes also get
the request-path services' filters before the router (``service_filters``, see
:mod:`legation.translate._services`).
"""

from __future__ import annotations

from collections.abc import Sequence

from envoy.config.accesslog.v3 import accesslog_pb2
from envoy.config.core.v3 import base_pb2, protocol_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.extensions.filters.http.fault.v3 import fault_pb2
from envoy.extensions.filters.http.local_ratelimit.v3 import local_rate_limit_pb2 as lrl_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from envoy.extensions.http.early_header_mutation.header_mutation.v3 import (
    header_mutation_pb2 as early_pb2,
)

from legation._proto import address, ads_source, pack
from legation.translate._names import (
    EARLY_HEADER_MUTATION,
    FAULT_FILTER,
    HCM_FILTER,
    LOCAL_RATELIMIT_FILTER,
    ROUTER_FILTER,
    TCP_PROXY_FILTER,
)

_DIRECTION = {
    "inbound": base_pb2.INBOUND,
    "outbound": base_pb2.OUTBOUND,
    "gateway": base_pb2.UNSPECIFIED,
}


def http_listener(
    name: str,
    host: str,
    port: int,
    *,
    route_config: str,
    stat_prefix: str,
    edge: bool = False,
    service_filters: Sequence[hcm_pb2.HttpFilter] = (),
    path_normalization: str = "merge_slashes",
    tracing: hcm_pb2.HttpConnectionManager.Tracing | None = None,
    access_logs: Sequence[accesslog_pb2.AccessLog] = (),
    strip_headers: Sequence[str] = (),
) -> listener_pb2.Listener:
    """``access_logs``: the connection manager's (see :mod:`legation.translate._accesslog`).
    ``edge``: the listener trusts no client's X-Forwarded-For and uses the peer's address
    (the gateway, and sidecar outbound listeners, where the client is the app), and drops
    client headers whose names hold an underscore.
    ``service_filters`` go after fault and local_ratelimit, before the router.
    ``path_normalization``: see :attr:`legation.config.model.Mesh.path_normalization`.
    ``tracing``: the tracer and sampling rate (:mod:`legation.translate._tracing`).
    ``strip_headers``: removed from every request before the route is picked (Envoy's early
    header mutation), so a client cannot send a header only Legation's filters may set."""
    hcm = hcm_pb2.HttpConnectionManager(
        stat_prefix=stat_prefix,
        codec_type=hcm_pb2.HttpConnectionManager.AUTO,
        rds=hcm_pb2.Rds(config_source=ads_source(), route_config_name=route_config),
        http_filters=[
            hcm_pb2.HttpFilter(name=FAULT_FILTER, typed_config=pack(fault_pb2.HTTPFault())),
            hcm_pb2.HttpFilter(
                name=LOCAL_RATELIMIT_FILTER,
                typed_config=pack(lrl_pb2.LocalRateLimit(stat_prefix=stat_prefix)),
            ),
            *service_filters,
            hcm_pb2.HttpFilter(name=ROUTER_FILTER, typed_config=pack(router_pb2.Router())),
        ],
    )
    hcm.access_log.extend(access_logs)
    if strip_headers:
        mutation = early_pb2.HeaderMutation()
        for header in strip_headers:
            mutation.mutations.add().remove = header
        hcm.early_header_mutation_extensions.add(name=EARLY_HEADER_MUTATION).typed_config.Pack(
            mutation
        )
    if edge:
        hcm.use_remote_address.value = True
        # x_user would reach apps that read it as x-user (CGI/WSGI) past every check of x-user
        hcm.common_http_protocol_options.headers_with_underscores_action = (
            protocol_pb2.HttpProtocolOptions.DROP_HEADER
        )
    if tracing is not None:
        hcm.tracing.CopyFrom(tracing)
    normalize_paths(hcm, path_normalization)
    return _listener(name, host, port, stat_prefix, HCM_FILTER, pack(hcm))


def normalize_paths(hcm: hcm_pb2.HttpConnectionManager, mode: str) -> None:
    """Envoy's path normalisation, applied before routing, ext_authz, ext_proc and rate limits,
    so they all see one spelling of a path (``/a/../admin``, ``//admin`` and, when decoding,
    ``/%2Fadmin`` all become ``/admin``)."""
    if mode == "none":
        return
    hcm.normalize_path.value = True
    if mode in ("merge_slashes", "decode_and_merge_slashes"):
        hcm.merge_slashes = True
    if mode == "decode_and_merge_slashes":
        hcm.path_with_escaped_slashes_action = hcm_pb2.HttpConnectionManager.UNESCAPE_AND_FORWARD


def tcp_listener(
    name: str, host: str, port: int, *, cluster: str, stat_prefix: str
) -> listener_pb2.Listener:
    proxy = tcp_proxy_pb2.TcpProxy(stat_prefix=stat_prefix, cluster=cluster)
    return _listener(name, host, port, stat_prefix, TCP_PROXY_FILTER, pack(proxy))


def _listener(
    name: str, host: str, port: int, stat_prefix: str, filter_name: str, config: object
) -> listener_pb2.Listener:
    return listener_pb2.Listener(
        name=name,
        address=address(host, port),
        stat_prefix=stat_prefix,
        traffic_direction=_DIRECTION[name],
        filter_chains=[
            listener_components_pb2.FilterChain(
                filters=[listener_components_pb2.Filter(name=filter_name, typed_config=config)]
            )
        ],
    )
