"""Mesh identity and encryption: a CA, SPIFFE workload certificates, rotation, SDS secrets.

* :mod:`~legation.certs.ca`: the root (generated and kept in a directory, or loaded) and issuing;
* :mod:`~legation.certs.spiffe`: the SPIFFE id scheme;
* :mod:`~legation.certs.workload`: an issued certificate and when it is due for renewal;
* :mod:`~legation.certs.sds`: certificates as Envoy SDS secrets;
* :mod:`~legation.certs.issuer`: a mesh's proxies' (and embedded services') certificates,
  followed across reloads;
* :mod:`~legation.certs.roots`: rotating a generated root with an overlap (``legation ca
  rotate-root``): the next root's files, the recorded phase, the old root's retirement;
* :mod:`~legation.certs.rotation`: the timer that renews certificates and walks those phases;
* :mod:`~legation.certs.enrol`: the xDS enrolment credentials of proxies (from the xDS root,
  kept beside the mesh CA and separate from it), and which is current;
* :mod:`~legation.certs.xds_auth`: the xDS server's authenticator built on them (imported from
  its module, so that importing this package does not load gRPC).
"""

from legation.certs.ca import CertificateAuthority
from legation.certs.errors import CertError
from legation.certs.issuer import MeshIssuer, proxy_identities, service_identity
from legation.certs.sds import TRUST_BUNDLE, WORKLOAD_CERT, proxy_secrets
from legation.certs.spiffe import spiffe_id
from legation.certs.workload import WorkloadCert

__all__ = [
    "TRUST_BUNDLE",
    "WORKLOAD_CERT",
    "CertError",
    "CertificateAuthority",
    "MeshIssuer",
    "WorkloadCert",
    "proxy_identities",
    "proxy_secrets",
    "service_identity",
    "spiffe_id",
]
