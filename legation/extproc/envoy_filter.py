"""The Envoy side of the ext_proc service: the HTTP filter, its per-route config, the gRPC cluster.

The mesh translation calls these to wire the service into generated Envoy configs; the integration
tests build their static bootstraps with them too, so what is generated here runs in a real Envoy.

* :func:`http_filter` - the ``envoy.filters.http.ext_proc`` HttpFilter for the listener. Its
  default mode sends nothing but request headers; each route then says what it needs.
* :func:`per_route` - an ``ExtProcPerRoute`` for one route: disabled when the route has no chain,
  otherwise the chain's ``processing_mode`` (only the phases its filters declare), its failure
  policy, and the chain name in the stream's gRPC initial metadata (``x-legation-chain``).
* :func:`grpc_cluster` - a static HTTP/2 cluster pointing at the service.
* :func:`http_transport_filter` / :func:`enabled_here` - one chain over Envoy's HTTP transport
  (``http_service``, work-in-progress in Envoy): a filter of its own per chain, disabled unless
  a route enables it, POSTing to the chain's path (:mod:`legation.extproc.http_server`).
"""

from __future__ import annotations

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2, http_service_pb2, http_uri_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.extensions.filters.http.ext_proc.v3 import ext_proc_pb2, processing_mode_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from google.protobuf import any_pb2, wrappers_pb2

from legation import envoy_grpc
from legation._proto import envoy_grpc as grpc_service
from legation._proto import http_filter as _http_filter
from legation._proto import pack, seconds
from legation.extproc.chain import Chain
from legation.extproc.config import CHAIN_METADATA_KEY
from legation.extproc.exchange import METADATA_NAMESPACE
from legation.extproc.http_server import chain_path

FILTER_NAME = "envoy.filters.http.ext_proc"
_PM = processing_mode_pb2.ProcessingMode


def http_filter(
    cluster: str,
    *,
    message_timeout: float = 0.2,
    failure_mode_allow: bool = False,
    name: str = FILTER_NAME,
) -> hcm_pb2.HttpFilter:
    """The ext_proc HttpFilter calling the gRPC service behind ``cluster``.

    ``message_timeout`` is how long Envoy waits for each answer (give the service the same value,
    :attr:`legation.extproc.service.Settings.message_timeout`: it answers within 80% of it).
    Filters may set dynamic metadata in namespace ``legation.extproc`` and ask for a body with
    ``mode_override``.
    """
    config = ext_proc_pb2.ExternalProcessor(
        grpc_service=grpc_service(cluster),
        failure_mode_allow=failure_mode_allow,
        message_timeout=seconds(message_timeout),
        processing_mode=_PM(
            request_header_mode=_PM.SEND,
            response_header_mode=_PM.SKIP,
            request_trailer_mode=_PM.SKIP,
            response_trailer_mode=_PM.SKIP,
        ),
        allow_mode_override=True,
    )
    config.metadata_options.receiving_namespaces.untyped.append(METADATA_NAMESPACE)
    return _http_filter(name, config)


def per_route(
    chain: Chain | None,
    *,
    fail_open: bool | None = None,
    service_cluster: str | None = None,
) -> ext_proc_pb2.ExtProcPerRoute:
    """The route's ext_proc settings: ``chain`` None (or a chain declaring no phase) disables the
    filter on the route. ``fail_open`` defaults to the chain's own policy; ``service_cluster``
    sends the route's streams to another service cluster."""
    if chain is None or not chain.phases:
        return ext_proc_pb2.ExtProcPerRoute(disabled=True)
    overrides = ext_proc_pb2.ExtProcOverrides(processing_mode=chain.processing_mode())
    overrides.grpc_initial_metadata.append(
        base_pb2.HeaderValue(key=CHAIN_METADATA_KEY, value=chain.name)
    )
    allow = chain.fail_open if fail_open is None else fail_open
    overrides.failure_mode_allow.CopyFrom(wrappers_pb2.BoolValue(value=allow))
    if service_cluster is not None:
        overrides.grpc_service.CopyFrom(grpc_service(service_cluster))
    return ext_proc_pb2.ExtProcPerRoute(overrides=overrides)


def typed_per_filter_config(
    chain: Chain | None, *, name: str = FILTER_NAME, **kwargs: object
) -> dict[str, any_pb2.Any]:
    """``{filter name: Any(ExtProcPerRoute)}`` for a route's ``typed_per_filter_config``."""
    return {name: pack(per_route(chain, **kwargs))}  # type: ignore[arg-type]


def grpc_cluster(
    name: str, host: str, port: int, *, connect_timeout: float = 1.0
) -> cluster_pb2.Cluster:
    """A static HTTP/2 cluster for the service (see :mod:`legation.envoy_grpc`)."""
    return envoy_grpc.grpc_cluster(
        name, [(host, port)], connect_timeout_ms=round(connect_timeout * 1000)
    )


HTTP_HOST = "legation-extproc"
"""The Host of the HTTP transport's calls (Envoy sends them to the filter's cluster)."""


def http_transport_filter(
    name: str, cluster: str, chain: Chain, *, message_timeout: float = 0.2
) -> hcm_pb2.HttpFilter:
    """An ext_proc filter serving ``chain`` over Envoy's HTTP transport: each message a POST of
    its JSON to the chain's path on ``cluster``, the chain's phases and failure policy at the
    filter level (Envoy's per-route overrides cannot change ``http_service``, so each chain
    has its own filter). Disabled unless a route enables it (:func:`enabled_here`)."""
    config = ext_proc_pb2.ExternalProcessor(
        http_service=ext_proc_pb2.ExtProcHttpService(
            http_service=http_service_pb2.HttpService(
                http_uri=http_uri_pb2.HttpUri(
                    uri=f"http://{HTTP_HOST}{chain_path(chain.name)}",
                    cluster=cluster,
                    # a backstop only: with the same value as message_timeout, whichever timer
                    # fired first decided between 504 (message timeout, as on gRPC) and the
                    # failure mode's 500; twice as long, the message timeout always decides
                    timeout=seconds(2 * message_timeout),
                )
            )
        ),
        failure_mode_allow=chain.fail_open,
        message_timeout=seconds(message_timeout),
        processing_mode=chain.processing_mode(),
    )
    config.metadata_options.receiving_namespaces.untyped.append(METADATA_NAMESPACE)
    out = _http_filter(name, config)
    out.disabled = True
    return out


def enabled_here() -> any_pb2.Any:
    """A route's ``typed_per_filter_config`` entry turning on a filter disabled by default
    (Envoy refuses an empty one: it carries an ``ExtProcPerRoute`` that overrides nothing)."""
    nothing = ext_proc_pb2.ExtProcPerRoute(overrides=ext_proc_pb2.ExtProcOverrides())
    return pack(rc.FilterConfig(config=pack(nothing)))
