"""The mesh's xDS authenticator: enrolment credentials signed by the xDS root, one node each.

Implements :class:`legation.xds.auth.Authenticator`. The server requires a client certificate
chaining to the xDS root (:func:`legation.certs.enrol.xds_root`, not the mesh root: a workload
certificate fails the handshake); :class:`XdsAuth` then reads the peer certificate from the call's
auth context and accepts it only if it is an enrolment credential (:mod:`legation.certs.enrol`):
signed by that root, an end-entity certificate (``BasicConstraints`` ``ca=False``) for client
authentication (the ``clientAuth`` extended key usage), its only URI SAN names a node, it is
within its validity period, and its serial is that node's newest one.

The serving certificate is issued from the xDS root for the hosts proxies dial and re-issued on a
new handshake once 2/3 of its lifetime has passed (gRPC asks for it per handshake).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.x509.oid import ExtendedKeyUsageOID

from legation.certs.ca import CertificateAuthority
from legation.certs.enrol import (
    SERVER_TTL,
    Enrolments,
    NodeFiles,
    issue_server_credential,
    node_of_uri,
)
from legation.certs.workload import WorkloadCert
from legation.xds.auth import Refused, channel_credentials


@dataclass
class XdsAuth:
    """The xDS server's TLS material and its per-call identity check, from the xDS root and the
    enrolments recorded beside the mesh CA (an :class:`~legation.xds.auth.Authenticator`)."""

    ca: CertificateAuthority
    enrolments: Enrolments
    hosts: list[str]
    clock: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))
    _serving: WorkloadCert | None = field(default=None, init=False, repr=False)

    @classmethod
    def for_ca(
        cls,
        ca: CertificateAuthority,
        ca_home: Any,
        *,
        hosts: list[str],
        clock: Callable[[], datetime] | None = None,
    ) -> XdsAuth:
        """Checks against ``ca`` (the xDS root) and the enrolments recorded in ``ca_home``
        (a Path: the mesh CA's directory)."""
        extra = {"clock": clock} if clock is not None else {}
        return cls(ca=ca, enrolments=Enrolments.beside(ca_home), hosts=hosts, **extra)

    # -- TLS ---------------------------------------------------------------------------------

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self._certificate_configuration(),
            self._fetch_configuration,
            require_client_authentication=True,
        )

    def _certificate_configuration(self) -> Any:
        self._serving = issue_server_credential(
            self.ca, self.hosts, ttl=SERVER_TTL, now=self.clock()
        )
        return grpc.ssl_server_certificate_configuration(
            [(self._serving.key_pem, self._serving.cert_pem)], root_certificates=self.ca.root_pem
        )

    def _fetch_configuration(self) -> Any:
        """Called by gRPC on every handshake: None keeps the current certificate."""
        if self._serving is not None and not self._serving.due(self.clock()):
            return None
        return self._certificate_configuration()

    # -- identity ----------------------------------------------------------------------------

    def peer_node(self, context: Any) -> str:
        """The node id the peer's credential names; raises :class:`Refused`."""
        return self._verified(context)[0]

    def rechecker(self, context: Any) -> Callable[[], object]:
        """A cheap check for an open stream, run before each push: the peer's certificate,
        verified once here, must still be within its validity and its node's newest serial
        (a revoked or expired credential raises :class:`Refused`). No parsing or signature
        work per call after the first: the stream's certificate cannot change."""
        verified: list[tuple[str, x509.Certificate]] = []

        def recheck() -> None:
            if not verified:
                verified.append(self._verified(context))  # raises Refused, as at the start
            self._current(*verified[0])

        return recheck

    def _verified(self, context: Any) -> tuple[str, x509.Certificate]:
        pems = context.auth_context().get("x509_pem_cert") or []
        if not pems:
            raise Refused(
                "no_credential",
                grpc.StatusCode.UNAUTHENTICATED,
                "xDS needs a client certificate (see `legation bootstrap`)",
            )
        try:
            cert = x509.load_pem_x509_certificate(pems[0])
            cert.verify_directly_issued_by(self.ca.cert)
            sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            uris = sans.get_values_for_type(x509.UniformResourceIdentifier)
        except (ValueError, TypeError, InvalidSignature, x509.ExtensionNotFound):
            raise Refused(
                "bad_credential",
                grpc.StatusCode.UNAUTHENTICATED,
                "the client certificate is not a credential of this mesh",
            ) from None
        if not _client_leaf(cert):
            raise Refused(
                "bad_credential",
                grpc.StatusCode.UNAUTHENTICATED,
                "the client certificate is not an end-entity certificate for client authentication",
            )
        nodes = [n for n in map(node_of_uri, uris) if n is not None]
        if len(nodes) != 1 or len(uris) != 1:
            raise Refused(
                "not_a_node",
                grpc.StatusCode.UNAUTHENTICATED,
                "the client certificate is not an xDS node credential",
            )
        node = nodes[0]
        self._current(node, cert)
        return node, cert

    def _current(self, node: str, cert: x509.Certificate) -> None:
        now = self.clock()
        if not cert.not_valid_before_utc <= now < cert.not_valid_after_utc:
            raise Refused(
                "expired",
                grpc.StatusCode.UNAUTHENTICATED,
                "the xDS credential has expired (or is not valid yet)",
            )
        if self.enrolments.current(node) != cert.serial_number:
            raise Refused(
                "superseded",
                grpc.StatusCode.UNAUTHENTICATED,
                "the xDS credential was revoked or superseded; enrol again",
            )


def _client_leaf(cert: x509.Certificate) -> bool:
    """``BasicConstraints`` present with ``ca=False``, and ``clientAuth`` among the extended key
    usages (present): what :func:`~legation.certs.enrol.issue_node_credential` issues."""
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except (x509.ExtensionNotFound, ValueError):
        return False
    return not constraints.ca and ExtendedKeyUsageOID.CLIENT_AUTH in usages


def serving_hosts(*hosts: str) -> list[str]:
    """SANs for the serving certificate: the hosts proxies dial (a wildcard listen address is
    not one), plus the loopback names so local tools can connect."""
    out: list[str] = []
    for host in (*hosts, "127.0.0.1", "localhost"):
        if host and host not in ("0.0.0.0", "::", "[::]") and host not in out:
            out.append(host)
    return out


def files_credentials(files: NodeFiles) -> grpc.ChannelCredentials:
    """A node's enrolment credential, as read from its files, for a (non-Envoy) client."""
    return channel_credentials(*files.read())
