"""Mesh mTLS in Envoy terms: TLS contexts fed by SDS over ADS, and the SDS consistency check.

* Sidecar inbound listeners terminate TLS with the proxy's certificate (secret
  ``legation-workload-cert``) and require a client certificate that chains to the trust bundle
  (``legation-trust-bundle``, the mesh root only) and names a SPIFFE id of the mesh's trust
  domain (URI SAN ``spiffe://<trust_domain>/ns/*/sa/*``, never one of Legation's own
  ``legation-<kind>`` services; a second line behind the separate roots:
  an xDS enrolment credential is never a mesh peer). ``strict``: that is the only filter chain.
  ``permissive``: a ``tls_inspector`` listener filter tells TLS from plaintext; TLS connections
  take the secured chain (``transport_protocol: tls``), plaintext ones an identical chain without
  TLS. HTTP inbound connection managers replace ``x-forwarded-client-cert`` with the verified
  peer's URI (its SPIFFE id), so the app learns who called.
* Clusters whose endpoints are sidecars (``outbound|S[|subset]``) originate TLS with the proxy's
  certificate and accept only a server certificate whose URI SAN is S's SPIFFE id. Endpoints
  without a sidecar speak plaintext: a cluster mixing both selects TLS per endpoint by the
  endpoint metadata ``envoy.transport_socket_match: {legation.mtls: true}``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.extensions.filters.listener.tls_inspector.v3 import tls_inspector_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2, tls_pb2
from envoy.type.matcher.v3 import regex_pb2, string_pb2
from google.protobuf import struct_pb2, wrappers_pb2

from legation._proto import ads_source, pack
from legation.certs.sds import TRUST_BUNDLE, WORKLOAD_CERT
from legation.certs.spiffe import SERVICE_PREFIX
from legation.translate._names import HCM_FILTER
from legation.xds.snapshot import InconsistentSnapshot, Snapshot
from legation.xds.types import ResourceType

TLS_SOCKET = "envoy.transport_sockets.tls"
TLS_INSPECTOR = "envoy.filters.listener.tls_inspector"
MATCH_KEY = "legation.mtls"  # endpoint metadata under envoy.transport_socket_match
_SOCKET_MATCH = "envoy.transport_socket_match"


def _sds(name: str) -> secret_pb2.SdsSecretConfig:
    return secret_pb2.SdsSecretConfig(name=name, sds_config=ads_source())


def _not_starting_with(word: str) -> str:
    """An RE2 pattern (RE2 has no lookahead) for one path segment that does not start with
    ``word``: it differs from ``word`` at some position, or is a proper prefix of it."""
    alternatives = [f"{re.escape(word[:i])}[^{re.escape(word[i])}/][^/]*" for i in range(len(word))]
    alternatives += [re.escape(word[:i]) for i in range(1, len(word))]
    return "(?:" + "|".join(alternatives) + ")"


def workload_peer(trust_domain: str) -> string_pb2.StringMatcher:
    """The URI SAN a sidecar accepts from a caller: a workload of ``trust_domain``
    (``spiffe://<td>/ns/<ns>/sa/<name>``), never one of Legation's own services
    (``.../sa/legation-<kind>``): their certificates also authenticate them as clients (to the
    trace receiver), but they never call an app."""
    pattern = (
        f"^spiffe://{re.escape(trust_domain)}/ns/[^/]+/sa/{_not_starting_with(SERVICE_PREFIX)}$"
    )
    return string_pb2.StringMatcher(safe_regex=regex_pb2.RegexMatcher(regex=pattern))


def downstream_tls(trust_domain: str) -> base_pb2.TransportSocket:
    """A sidecar's inbound side: our certificate; a client certificate from the mesh required,
    naming a workload of ``trust_domain``."""
    context = tls_pb2.DownstreamTlsContext(
        common_tls_context=tls_pb2.CommonTlsContext(
            tls_certificate_sds_secret_configs=[_sds(WORKLOAD_CERT)],
            combined_validation_context=tls_pb2.CommonTlsContext.CombinedCertificateValidationContext(
                default_validation_context=common_pb2.CertificateValidationContext(
                    match_typed_subject_alt_names=[
                        common_pb2.SubjectAltNameMatcher(
                            san_type=common_pb2.SubjectAltNameMatcher.URI,
                            matcher=workload_peer(trust_domain),
                        )
                    ]
                ),
                validation_context_sds_secret_config=_sds(TRUST_BUNDLE),
            ),
        ),
        require_client_certificate=wrappers_pb2.BoolValue(value=True),
    )
    return base_pb2.TransportSocket(name=TLS_SOCKET, typed_config=pack(context))


def upstream_tls(server_id: str, *, alpn: Sequence[str] = ()) -> base_pb2.TransportSocket:
    """To a sidecar (or a request-path service): our certificate; the server must chain to the
    bundle and be ``server_id``. ``alpn``: protocols to offer (gRPC servers want ``h2``)."""
    context = tls_pb2.UpstreamTlsContext(
        common_tls_context=tls_pb2.CommonTlsContext(
            alpn_protocols=list(alpn),
            tls_certificate_sds_secret_configs=[_sds(WORKLOAD_CERT)],
            combined_validation_context=tls_pb2.CommonTlsContext.CombinedCertificateValidationContext(
                default_validation_context=common_pb2.CertificateValidationContext(
                    match_typed_subject_alt_names=[
                        common_pb2.SubjectAltNameMatcher(
                            san_type=common_pb2.SubjectAltNameMatcher.URI,
                            matcher=string_pb2.StringMatcher(exact=server_id),
                        )
                    ]
                ),
                validation_context_sds_secret_config=_sds(TRUST_BUNDLE),
            ),
        ),
    )
    return base_pb2.TransportSocket(name=TLS_SOCKET, typed_config=pack(context))


def secure_inbound(listener: listener_pb2.Listener, *, permissive: bool, trust_domain: str) -> None:
    """Make a sidecar's inbound listener (one filter chain) terminate mTLS, in place, for
    peers of ``trust_domain``."""
    chain = listener.filter_chains[0]
    for f in chain.filters:
        if f.name == HCM_FILTER:
            hcm = hcm_pb2.HttpConnectionManager()
            f.typed_config.Unpack(hcm)
            hcm.forward_client_cert_details = hcm_pb2.HttpConnectionManager.SANITIZE_SET
            hcm.set_current_client_cert_details.uri = True
            f.typed_config.CopyFrom(pack(hcm))
    plain = listener_components_pb2.FilterChain()
    plain.CopyFrom(chain)
    chain.transport_socket.CopyFrom(downstream_tls(trust_domain))
    if permissive:
        listener.listener_filters.append(
            listener_components_pb2.ListenerFilter(
                name=TLS_INSPECTOR, typed_config=pack(tls_inspector_pb2.TlsInspector())
            )
        )
        chain.filter_chain_match.transport_protocol = "tls"
        plain.filter_chain_match.transport_protocol = "raw_buffer"
        listener.filter_chains.append(plain)


def secure_cluster(
    cluster: cluster_pb2.Cluster,
    endpoints: endpoint_pb2.ClusterLoadAssignment,
    sidecars: list[bool],
    server_id: str,
) -> None:
    """Originate mTLS to the endpoints that are sidecars (``sidecars`` follows the CLA's
    endpoints, in order), in place."""
    if not any(sidecars):
        return
    if all(sidecars):
        cluster.transport_socket.CopyFrom(upstream_tls(server_id))
        return
    cluster.transport_socket_matches.append(
        cluster_pb2.Cluster.TransportSocketMatch(
            name="mtls",
            match=struct_pb2.Struct(fields={MATCH_KEY: struct_pb2.Value(bool_value=True)}),
            transport_socket=upstream_tls(server_id),
        )
    )
    lb_endpoints = [e for group in endpoints.endpoints for e in group.lb_endpoints]
    for lb_endpoint, is_sidecar in zip(lb_endpoints, sidecars, strict=True):
        if is_sidecar:
            meta = lb_endpoint.metadata.filter_metadata[_SOCKET_MATCH]
            meta.fields[MATCH_KEY].bool_value = True


def _sds_names(socket: base_pb2.TransportSocket) -> Iterable[str]:
    if socket.name != TLS_SOCKET:
        return
    if socket.typed_config.Is(tls_pb2.DownstreamTlsContext.DESCRIPTOR):
        down = tls_pb2.DownstreamTlsContext()
        socket.typed_config.Unpack(down)
        common = down.common_tls_context
    else:
        up = tls_pb2.UpstreamTlsContext()
        socket.typed_config.Unpack(up)
        common = up.common_tls_context
    yield from (c.name for c in common.tls_certificate_sds_secret_configs)
    if common.HasField("validation_context_sds_secret_config"):
        yield common.validation_context_sds_secret_config.name
    combined = common.combined_validation_context
    if combined.HasField("validation_context_sds_secret_config"):
        yield combined.validation_context_sds_secret_config.name


def sds_names(snapshot: Snapshot) -> set[str]:
    """SDS names that the snapshot's listeners and clusters reference."""
    sockets: list[base_pb2.TransportSocket] = []
    for res in snapshot.resources(ResourceType.LISTENER).values():
        listener: listener_pb2.Listener = res.message
        sockets += [c.transport_socket for c in listener.filter_chains]
    for res in snapshot.resources(ResourceType.CLUSTER).values():
        cluster: cluster_pb2.Cluster = res.message
        sockets.append(cluster.transport_socket)
        sockets += [m.transport_socket for m in cluster.transport_socket_matches]
    return {name for s in sockets for name in _sds_names(s)}


def check_sds(snapshot: Snapshot) -> None:
    """Raise :class:`InconsistentSnapshot` naming every referenced secret that is missing (the
    EDS/RDS check is :meth:`Snapshot.check_consistent`)."""
    missing = sds_names(snapshot) - set(snapshot.resources(ResourceType.SECRET))
    if missing:
        label = f"snapshot {snapshot.label!r}: " if snapshot.label else "snapshot: "
        raise InconsistentSnapshot(
            label
            + "listeners and clusters reference missing secrets (SDS): "
            + ", ".join(sorted(missing))
        )
