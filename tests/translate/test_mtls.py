"""translate() with ``mtls``: inbound listeners terminate mTLS, clusters to sidecars originate it
(checking the server's SPIFFE id), every proxy carries its two SDS secrets; against expected
protobufs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2, config_source_pb2
from envoy.config.listener.v3 import listener_components_pb2 as lc
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.listener.tls_inspector.v3 import tls_inspector_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2, tls_pb2
from envoy.type.matcher.v3 import string_pb2
from google.protobuf import any_pb2, struct_pb2, wrappers_pb2

from legation.certs import TRUST_BUNDLE, WORKLOAD_CERT, MeshIssuer
from legation.config import Mesh
from legation.translate import translate
from legation.translate._mtls import workload_peer
from legation.xds.snapshot import InconsistentSnapshot, Snapshot
from legation.xds.types import ResourceType
from tests.config.meshdata import base, parse

ADS = config_source_pb2.ConfigSource(
    ads=config_source_pb2.AggregatedConfigSource(), resource_api_version=config_source_pb2.V3
)
REVIEWS_ID = "spiffe://cluster.local/ns/default/sa/reviews"


def packed(message: Any) -> any_pb2.Any:
    out = any_pb2.Any()
    out.Pack(message)
    return out


def sds(name: str) -> secret_pb2.SdsSecretConfig:
    return secret_pb2.SdsSecretConfig(name=name, sds_config=ADS)


EXPECTED_DOWNSTREAM = base_pb2.TransportSocket(
    name="envoy.transport_sockets.tls",
    typed_config=packed(
        tls_pb2.DownstreamTlsContext(
            common_tls_context=tls_pb2.CommonTlsContext(
                tls_certificate_sds_secret_configs=[sds(WORKLOAD_CERT)],
                combined_validation_context=tls_pb2.CommonTlsContext.CombinedCertificateValidationContext(
                    default_validation_context=common_pb2.CertificateValidationContext(
                        match_typed_subject_alt_names=[
                            common_pb2.SubjectAltNameMatcher(
                                san_type=common_pb2.SubjectAltNameMatcher.URI,
                                matcher=workload_peer("cluster.local"),  # see test_owned_headers
                            )
                        ]
                    ),
                    validation_context_sds_secret_config=sds(TRUST_BUNDLE),
                ),
            ),
            require_client_certificate=wrappers_pb2.BoolValue(value=True),
        )
    ),
)


def expected_upstream(server_id: str) -> base_pb2.TransportSocket:
    combined = tls_pb2.CommonTlsContext.CombinedCertificateValidationContext(
        default_validation_context=common_pb2.CertificateValidationContext(
            match_typed_subject_alt_names=[
                common_pb2.SubjectAltNameMatcher(
                    san_type=common_pb2.SubjectAltNameMatcher.URI,
                    matcher=string_pb2.StringMatcher(exact=server_id),
                )
            ]
        ),
        validation_context_sds_secret_config=sds(TRUST_BUNDLE),
    )
    return base_pb2.TransportSocket(
        name="envoy.transport_sockets.tls",
        typed_config=packed(
            tls_pb2.UpstreamTlsContext(
                common_tls_context=tls_pb2.CommonTlsContext(
                    tls_certificate_sds_secret_configs=[sds(WORKLOAD_CERT)],
                    combined_validation_context=combined,
                )
            )
        ),
    )


@pytest.fixture
def issuer(tmp_path: Path) -> MeshIssuer:
    return MeshIssuer(mesh_dir=tmp_path, default_ca_dir=tmp_path / "ca")


def mtls_mesh(mode: str = "strict") -> Mesh:
    data = base()
    data["mtls"] = {"mode": mode}
    return parse(data)


def served(issuer: MeshIssuer, mesh: Mesh, version: str = "v1") -> dict[str, Snapshot]:
    issuer.update(mesh)
    return translate(mesh, version=version, secrets=issuer.secrets())


def listener(snap: Snapshot, name: str) -> listener_pb2.Listener:
    return snap.resources(ResourceType.LISTENER)[name].message  # type: ignore[return-value]


def hcm_of(chain: lc.FilterChain) -> hcm_pb2.HttpConnectionManager:
    hcm = hcm_pb2.HttpConnectionManager()
    chain.filters[0].typed_config.Unpack(hcm)
    return hcm


def test_strict_inbound_terminates_mtls(issuer: MeshIssuer) -> None:
    plain = translate(parse(base()), version="v1")["sidecar-reviews-0"]
    snap = served(issuer, mtls_mesh())["sidecar-reviews-0"]
    inbound = listener(snap, "inbound")
    assert len(inbound.filter_chains) == 1 and not inbound.listener_filters
    chain = inbound.filter_chains[0]
    assert chain.transport_socket == EXPECTED_DOWNSTREAM
    # the same connection manager as without mTLS, plus the verified caller's id for the app
    expected_hcm = hcm_of(listener(plain, "inbound").filter_chains[0])
    expected_hcm.forward_client_cert_details = hcm_pb2.HttpConnectionManager.SANITIZE_SET
    expected_hcm.set_current_client_cert_details.uri = True
    assert hcm_of(chain) == expected_hcm
    # outbound (app -> its sidecar) stays plaintext
    assert listener(snap, "outbound") == listener(plain, "outbound")


def test_permissive_inbound_accepts_tls_and_plaintext(issuer: MeshIssuer) -> None:
    inbound = listener(served(issuer, mtls_mesh("permissive"))["sidecar-reviews-0"], "inbound")
    assert list(inbound.listener_filters) == [
        lc.ListenerFilter(
            name="envoy.filters.listener.tls_inspector",
            typed_config=packed(tls_inspector_pb2.TlsInspector()),
        )
    ]
    tls_chain, plain_chain = inbound.filter_chains
    assert tls_chain.filter_chain_match == lc.FilterChainMatch(transport_protocol="tls")
    assert tls_chain.transport_socket == EXPECTED_DOWNSTREAM
    assert plain_chain.filter_chain_match == lc.FilterChainMatch(transport_protocol="raw_buffer")
    assert not plain_chain.HasField("transport_socket")
    assert list(plain_chain.filters) == list(tls_chain.filters)


def test_clusters_to_sidecars_originate_mtls_and_check_the_spiffe_id(issuer: MeshIssuer) -> None:
    for node, snap in served(issuer, mtls_mesh()).items():
        clusters = snap.resources(ResourceType.CLUSTER)
        for name in ("outbound|reviews", "outbound|reviews|v1", "outbound|reviews|v2"):
            cluster: cluster_pb2.Cluster = clusters[name].message  # type: ignore[assignment]
            assert cluster.transport_socket == expected_upstream(REVIEWS_ID), (node, name)
        # ratings has no sidecar: its app is reached in plaintext
        assert not clusters["outbound|ratings"].message.HasField("transport_socket")
    sidecar = served(issuer, mtls_mesh())["sidecar-reviews-0"]
    # a sidecar reaches its own app in plaintext
    local = sidecar.resources(ResourceType.CLUSTER)["inbound|reviews"].message
    assert not local.HasField("transport_socket")


def test_a_service_mixing_sidecars_and_bare_apps_picks_tls_per_endpoint(
    issuer: MeshIssuer,
) -> None:
    data = base()
    data["mtls"] = {"mode": "strict"}
    data["services"][0]["endpoints"].append({"port": 9113, "labels": {"version": "v1"}})
    snap = served(issuer, parse(data))["gateway-ingress"]
    cluster = snap.resources(ResourceType.CLUSTER)["outbound|reviews|v1"].message
    assert not cluster.HasField("transport_socket")
    assert list(cluster.transport_socket_matches) == [
        cluster_pb2.Cluster.TransportSocketMatch(
            name="mtls",
            match=struct_pb2.Struct(fields={"legation.mtls": struct_pb2.Value(bool_value=True)}),
            transport_socket=expected_upstream(REVIEWS_ID),
        )
    ]
    cla = snap.resources(ResourceType.ENDPOINT)["outbound|reviews|v1"].message
    marks = [
        dict(e.metadata.filter_metadata["envoy.transport_socket_match"])
        for e in cla.endpoints[0].lb_endpoints
    ]
    assert marks == [{"legation.mtls": True}, {}]  # the sidecar at 15111, then the bare app
    # v2's only endpoint has a sidecar: a plain transport socket
    v2 = snap.resources(ResourceType.CLUSTER)["outbound|reviews|v2"].message
    assert v2.transport_socket == expected_upstream(REVIEWS_ID)


def test_every_proxy_gets_its_own_certificate_and_the_bundle(issuer: MeshIssuer) -> None:
    snaps = served(issuer, mtls_mesh())
    assert issuer.ca is not None
    for node, snap in snaps.items():
        secrets = snap.resources(ResourceType.SECRET)
        assert sorted(secrets) == sorted([TRUST_BUNDLE, WORKLOAD_CERT])
        cert: secret_pb2.Secret = secrets[WORKLOAD_CERT].message  # type: ignore[assignment]
        assert cert.tls_certificate.certificate_chain.inline_bytes == issuer.certs[node].cert_pem
        assert cert.tls_certificate.private_key.inline_bytes == issuer.certs[node].key_pem
        bundle = secrets[TRUST_BUNDLE].message
        assert bundle.validation_context.trusted_ca.inline_bytes == issuer.ca.root_pem
    ids = {n: c.spiffe_id for n, c in issuer.certs.items()}
    assert ids == {
        "sidecar-reviews-0": REVIEWS_ID,
        "sidecar-reviews-1": REVIEWS_ID,
        "gateway-ingress": "spiffe://cluster.local/ns/default/sa/ingress",
    }
    assert issuer.certs["sidecar-reviews-0"].serial != issuer.certs["sidecar-reviews-1"].serial


def test_off_is_unchanged_and_carries_no_secrets(issuer: MeshIssuer) -> None:
    mesh = parse(base())
    issuer.update(mesh)
    assert issuer.secrets() is None and issuer.status() is None
    plain = translate(mesh, version="v1")
    again = translate(mesh, version="v1", secrets=issuer.secrets())
    for node, snap in plain.items():
        assert not snap.resources(ResourceType.SECRET)
        for rtype in ResourceType:
            assert snap.version(rtype) == again[node].version(rtype)


def test_rotation_and_reloads_change_only_what_they_must(issuer: MeshIssuer) -> None:
    mesh = mtls_mesh()
    first = served(issuer, mesh)
    # a reload with the same identities keeps the certificates: nothing changes
    same = translate(mesh, version="v2", secrets=issuer.secrets())
    for node, snap in first.items():
        assert all(snap.version(t) == same[node].version(t) for t in ResourceType)
    # a rotation changes only the secrets
    assert issuer.rotate(force=True) == sorted(first)
    rotated = translate(mesh, version="v3", secrets=issuer.secrets())
    for node, snap in first.items():
        changed = {t for t in ResourceType if snap.version(t) != rotated[node].version(t)}
        assert changed == {ResourceType.SECRET}
        assert set(rotated[node].diff(snap, ResourceType.SECRET)[0]) == {WORKLOAD_CERT}


def test_missing_secrets_are_an_inconsistent_snapshot(issuer: MeshIssuer) -> None:
    mesh = mtls_mesh()
    with pytest.raises(InconsistentSnapshot) as info:
        translate(mesh, version="v9", secrets={})
    assert str(info.value) == (
        "snapshot 'v9': listeners and clusters reference missing secrets (SDS): "
        f"{TRUST_BUNDLE}, {WORKLOAD_CERT}"
    )
    # without secrets at all it is a check-only translation (``legation check``)
    assert not translate(mesh, version="v9")["gateway-ingress"].resources(ResourceType.SECRET)
