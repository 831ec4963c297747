"""Tracing in a proxy's config: Envoy's OpenTelemetry tracer on every connection manager, the
collector's cluster, and each route's own sampling rate.

When the mesh has a ``tracing`` block (:mod:`legation.config.tracing`), every HTTP connection
manager (gateway, sidecar inbound and outbound) gets ``envoy.tracers.opentelemetry`` exporting
OTLP/gRPC through cluster ``legation|tracing`` to the collector, with the mesh's sampling rate as
``random_sampling``; a route with ``tracing.sampling`` overrides it on that route. The tracer's
``service_name`` is the proxy's service (or the gateway's name), so a trace reads as
``ingress -> frontend -> reviews``, and each span is tagged with its route (:data:`ROUTE_TAG`).

With the embedded receiver and the mesh's mTLS on (``tracing.tls`` not ``none``) the collector
cluster is mesh mTLS like the request-path services' clusters: the proxy presents its workload
certificate (SDS), verifies the receiver against the trust bundle and accepts only the URI SAN
``spiffe://<trust_domain>/ns/<namespace>/sa/legation-tracing``, offering ALPN ``h2``; the
receiver accepts only certificates from the mesh CA, and each peer only under its own service
name (:mod:`legation.tracing.receiver`). With mTLS off, ``tls: none`` or an external collector
(Jaeger, the OTel Collector, which hold no SPIFFE identity) the hop is plaintext HTTP/2. What
crosses it is timing, route and service names, Legation's decisions and Envoy's standard tags:
no request header but ``x-request-id`` and the user agent, and the URL with its query string
(the embedded receiver drops the query; see SECURITY.md).
"""

from __future__ import annotations

import ipaddress

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.config.trace.v3 import http_tracer_pb2, opentelemetry_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.type.tracing.v3 import custom_tag_pb2
from envoy.type.v3 import percent_pb2

from legation._proto import envoy_grpc, pack, seconds
from legation.certs.locate import service_identity
from legation.certs.spiffe import TRACING
from legation.config.model import Mesh
from legation.config.routes import Route
from legation.config.tracing import tracing_tls
from legation.envoy_grpc import grpc_cluster
from legation.translate._mtls import upstream_tls

__all__ = [
    "OTEL_TRACER",
    "TRACING_CLUSTER",
    "hcm_tracing",
    "otel_tracing",
    "route_tracing",
    "tracing_clusters",
]

OTEL_TRACER = "envoy.tracers.opentelemetry"
TRACING_CLUSTER = "legation|tracing"
ROUTE_TAG = "route"
"""The span tag naming the mesh route that matched (what ``legation traces --route`` filters on)."""
_EXPORT_TIMEOUT_S = 2.0


def hcm_tracing(mesh: Mesh, *, service_name: str) -> hcm_pb2.HttpConnectionManager.Tracing | None:
    """The ``tracing`` of a connection manager of a proxy of ``service_name`` (None: no tracing
    block in the mesh)."""
    t = mesh.tracing
    return None if t is None else otel_tracing(t.sampling, service_name=service_name)


def otel_tracing(
    sampling: float, *, service_name: str, cluster: str = TRACING_CLUSTER
) -> hcm_pb2.HttpConnectionManager.Tracing:
    """Envoy's OpenTelemetry tracer exporting through ``cluster``, sampling ``sampling`` %."""
    config = opentelemetry_pb2.OpenTelemetryConfig(
        grpc_service=envoy_grpc(cluster, timeout=seconds(_EXPORT_TIMEOUT_S)),
        service_name=service_name,
    )
    return hcm_pb2.HttpConnectionManager.Tracing(
        random_sampling=percent_pb2.Percent(value=sampling),
        provider=http_tracer_pb2.Tracing.Http(name=OTEL_TRACER, typed_config=pack(config)),
        custom_tags=[custom_tag_pb2.CustomTag(tag=ROUTE_TAG, value="%ROUTE_NAME%")],
    )


def tracing_clusters(mesh: Mesh) -> list[cluster_pb2.Cluster]:
    """The collector's cluster (none without a tracing block), mesh mTLS to the embedded
    receiver when :func:`~legation.config.tracing.tracing_tls`. A host name is resolved by DNS
    (the compose stack's ``jaeger``), an address used as it is."""
    if mesh.tracing is None:
        return []
    host, port = mesh.tracing.address()
    cluster = grpc_cluster(TRACING_CLUSTER, [(host, port)])
    if not _is_ip(host):
        cluster.type = cluster_pb2.Cluster.STRICT_DNS
    if tracing_tls(mesh):
        cluster.transport_socket.CopyFrom(
            upstream_tls(service_identity(mesh, TRACING), alpn=("h2",))
        )
    return [cluster]


def route_tracing(out: rc.Route, spec: Route | None) -> None:
    """A route's own sampling rate, when it has one, in parts per ten thousand: Envoy draws the
    sample as the request id modulo 10,000 and compares it with the numerator, so a finer
    denominator would sample every request (measured: a MILLION-based 30 % traced 100 of 100).
    """
    if spec is None or spec.tracing is None:
        return
    out.tracing.random_sampling.CopyFrom(
        percent_pb2.FractionalPercent(
            numerator=round(spec.tracing.sampling * 100),
            denominator=percent_pb2.FractionalPercent.TEN_THOUSAND,
        )
    )


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
