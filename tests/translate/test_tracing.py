"""translate() with a tracing block: the OpenTelemetry tracer on every connection manager, the
collector's cluster (mesh mTLS to the embedded receiver in an mTLS mesh), each route's own
sampling rate."""

from __future__ import annotations

from typing import Any

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.trace.v3 import opentelemetry_pb2
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2
from envoy.type.v3 import percent_pb2

from legation.certs.sds import TRUST_BUNDLE, WORKLOAD_CERT
from legation.translate import translate
from legation.translate._mtls import TLS_SOCKET
from legation.translate._tracing import OTEL_TRACER, ROUTE_TAG, TRACING_CLUSTER
from legation.xds.types import ResourceType
from tests.config.meshdata import base, parse
from tests.translate.test_mesh import gateway_routes, hcm_of, message


def traced(**block: Any) -> dict[str, Any]:
    data = base()
    data["tracing"] = block
    return data


def test_no_tracing_block_no_tracer_and_no_cluster() -> None:
    for snap in translate(parse(base()), version="1").values():
        assert TRACING_CLUSTER not in snap.resources(ResourceType.CLUSTER)
        for res in snap.resources(ResourceType.LISTENER).values():
            assert not hcm_of(res.message).HasField("tracing")


def test_every_connection_manager_gets_the_tracer_with_the_mesh_rate() -> None:
    snaps = translate(parse(traced(sampling=12.5)), version="1")
    seen = []
    for node, snap in snaps.items():
        for name, res in snap.resources(ResourceType.LISTENER).items():
            tracing = hcm_of(res.message).tracing
            assert tracing.random_sampling.value == 12.5
            assert tracing.provider.name == OTEL_TRACER
            config = opentelemetry_pb2.OpenTelemetryConfig()
            assert tracing.provider.typed_config.Unpack(config)
            assert config.grpc_service.envoy_grpc.cluster_name == TRACING_CLUSTER
            assert [(t.tag, t.value) for t in tracing.custom_tags] == [(ROUTE_TAG, "%ROUTE_NAME%")]
            seen.append((node, name, config.service_name))
    assert sorted(seen) == [
        ("gateway-ingress", "gateway", "ingress"),
        ("sidecar-reviews-0", "inbound", "reviews"),
        ("sidecar-reviews-0", "outbound", "reviews"),
        ("sidecar-reviews-1", "inbound", "reviews"),
        ("sidecar-reviews-1", "outbound", "reviews"),
    ]


def test_embedded_collector_is_loopback_plaintext_h2() -> None:
    snap = translate(parse(traced(port=4999)), version="1")["gateway-ingress"]
    cluster: cluster_pb2.Cluster = message(snap, ResourceType.CLUSTER, TRACING_CLUSTER)
    assert cluster.type == cluster_pb2.Cluster.STATIC
    addr = cluster.load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address
    assert (addr.address, addr.port_value) == ("127.0.0.1", 4999)
    assert not cluster.HasField("transport_socket")


def tracing_cluster(data: dict[str, Any], node: str = "gateway-ingress") -> cluster_pb2.Cluster:
    snap = translate(parse(data), version="1")[node]
    cluster: cluster_pb2.Cluster = message(snap, ResourceType.CLUSTER, TRACING_CLUSTER)
    return cluster


@pytest.mark.parametrize("mode", ["strict", "permissive"])
def test_an_mtls_mesh_calls_the_embedded_receiver_over_mtls_pinned_to_its_id(mode: str) -> None:
    data = traced()
    data["mtls"] = {"mode": mode, "trust_domain": "corp.test", "namespace": "shop"}
    for node in ("gateway-ingress", "sidecar-reviews-0"):
        cluster = tracing_cluster(data, node)
        assert cluster.transport_socket.name == TLS_SOCKET
        context = tls_pb2.UpstreamTlsContext()
        assert cluster.transport_socket.typed_config.Unpack(context)
        common = context.common_tls_context
        assert list(common.alpn_protocols) == ["h2"]
        assert [c.name for c in common.tls_certificate_sds_secret_configs] == [WORKLOAD_CERT]
        combined = common.combined_validation_context
        assert combined.validation_context_sds_secret_config.name == TRUST_BUNDLE
        (san,) = combined.default_validation_context.match_typed_subject_alt_names
        assert san.matcher.exact == "spiffe://corp.test/ns/shop/sa/legation-tracing"


def test_tls_none_and_external_collectors_stay_plaintext() -> None:
    data = traced(tls="none")
    data["mtls"] = {"mode": "strict"}
    assert not tracing_cluster(data).HasField("transport_socket")
    data["tracing"] = {"collector": "jaeger:4317"}
    assert not tracing_cluster(data).HasField("transport_socket")


def test_a_collector_by_name_is_resolved_by_dns() -> None:
    snap = translate(parse(traced(collector="jaeger:4317")), version="1")["gateway-ingress"]
    cluster: cluster_pb2.Cluster = message(snap, ResourceType.CLUSTER, TRACING_CLUSTER)
    assert cluster.type == cluster_pb2.Cluster.STRICT_DNS
    addr = cluster.load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address
    assert (addr.address, addr.port_value) == ("jaeger", 4317)


def test_a_route_with_its_own_rate_overrides_the_mesh_rate() -> None:
    data = traced(sampling=1)
    data["routes"].insert(
        0,
        {
            "name": "sampled",
            "match": {"path": {"prefix": "/s"}},
            "to": {"service": "reviews"},
            "tracing": {"sampling": 0.01},
        },
    )
    snap = translate(parse(data), version="1")["gateway-ingress"]
    first, second = gateway_routes(snap)
    assert first.tracing.random_sampling == percent_pb2.FractionalPercent(
        numerator=1, denominator=percent_pb2.FractionalPercent.TEN_THOUSAND
    )
    assert not second.HasField("tracing")  # the connection manager's rate applies
