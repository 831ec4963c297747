"""Certificates as SDS secrets, delivered in each proxy's snapshot over its ADS stream.

Every proxy of an mTLS mesh gets two secrets (names are per proxy, as every snapshot is):

* :data:`WORKLOAD_CERT`: a ``tls_certificate`` with the proxy's certificate chain and key;
* :data:`TRUST_BUNDLE`: a ``validation_context`` with the root(s) peers are verified against.

A rotation changes only the first one's bytes, so only SDS is pushed and Envoy swaps the
certificate in its listeners and clusters without draining them.
"""

from __future__ import annotations

from envoy.config.core.v3 import base_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2

from legation.certs.workload import WorkloadCert

WORKLOAD_CERT = "legation-workload-cert"
TRUST_BUNDLE = "legation-trust-bundle"


def workload_secret(cert: WorkloadCert) -> secret_pb2.Secret:
    return secret_pb2.Secret(
        name=WORKLOAD_CERT,
        tls_certificate=common_pb2.TlsCertificate(
            certificate_chain=base_pb2.DataSource(inline_bytes=cert.cert_pem),
            private_key=base_pb2.DataSource(inline_bytes=cert.key_pem),
        ),
    )


def trust_bundle_secret(roots_pem: bytes) -> secret_pb2.Secret:
    return secret_pb2.Secret(
        name=TRUST_BUNDLE,
        validation_context=common_pb2.CertificateValidationContext(
            trusted_ca=base_pb2.DataSource(inline_bytes=roots_pem)
        ),
    )


def proxy_secrets(cert: WorkloadCert, roots_pem: bytes) -> list[secret_pb2.Secret]:
    """Both secrets of one proxy."""
    return [workload_secret(cert), trust_bundle_secret(roots_pem)]
