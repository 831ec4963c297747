"""SPIFFE ids of the mesh's workloads.

The scheme (Istio's, so tools that read Istio identities read ours)::

    spiffe://<trust_domain>/ns/<namespace>/sa/<service>

* ``trust_domain``: ``mtls.trust_domain`` (default ``cluster.local``); one CA per trust domain;
* ``namespace``: ``mtls.namespace`` (default ``default``), the mesh's name;
* ``service``: the service of a sidecar's instance (every instance of a service shares the
  identity), or, for the ingress gateway, the gateway's ``name`` (``ingress``); the mesh checks
  refuse a service named like the gateway when mTLS is on, so the two never share an identity.

The request-path services (ext_authz, ext_proc, rate limiting, the access-log service) have the
identity ``legation-<kind>`` (:func:`service_name`) in the same scheme when the mesh turns mTLS
on, and so does the embedded trace receiver (``legation-tracing``, :data:`TRACING`); the mesh
checks refuse a service or gateway of those names.

The id is the certificate's only URI SAN; Envoy puts the peer's in ``source.principal`` (what
ext_authz reads) and in ``x-forwarded-client-cert`` on the inbound side.
"""

from __future__ import annotations

import re

from legation.certs.errors import CertError

#: Reserved for the xDS enrolment credentials (see :mod:`legation.certs.enrol`): a mesh may not
#: use it, so a workload certificate can never pass for a proxy's xDS credential.
XDS_TRUST_DOMAIN = "xds.legation.internal"

_TRUST_DOMAIN = re.compile(r"^[a-z0-9._-]{1,255}$")
_SEGMENT = re.compile(r"^[A-Za-z0-9._-]+$")


def spiffe_id(trust_domain: str, namespace: str, name: str) -> str:
    """``spiffe://<trust_domain>/ns/<namespace>/sa/<name>``; raises ``bad_identity``."""
    if not _TRUST_DOMAIN.match(trust_domain):
        raise CertError(f"invalid SPIFFE trust domain {trust_domain!r}", code="bad_identity")
    if trust_domain == XDS_TRUST_DOMAIN:
        raise CertError(
            f"SPIFFE trust domain {trust_domain!r} is reserved for xDS enrolment",
            code="bad_identity",
        )
    for part in (namespace, name):
        if not _SEGMENT.match(part) or part in (".", ".."):
            raise CertError(f"invalid SPIFFE path segment {part!r}", code="bad_identity")
    return f"spiffe://{trust_domain}/ns/{namespace}/sa/{name}"


#: The prefix of the request-path services' identities (``legation-extauthz``, ...).
SERVICE_PREFIX = "legation-"


#: The embedded trace receiver's name among Legation's services (identity ``legation-tracing``).
TRACING = "tracing"


def service_name(kind: str) -> str:
    """The SPIFFE path name of request-path service ``kind`` (e.g. ``legation-extauthz``)."""
    return f"{SERVICE_PREFIX}{kind}"


def peer_spiffe_id(auth_context: dict[str, list[bytes]]) -> str | None:
    """The SPIFFE id of a gRPC call's peer (``context.auth_context()``): the only URI SAN of its
    verified certificate when it is a ``spiffe://`` id, else None (no certificate, several URIs,
    another scheme). The chain was verified by the TLS handshake; this only reads it."""
    from cryptography import x509

    pems = auth_context.get("x509_pem_cert") or []
    if not pems:
        return None
    try:
        cert = x509.load_pem_x509_certificate(pems[0])
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, x509.ExtensionNotFound):
        return None
    uris = sans.get_values_for_type(x509.UniformResourceIdentifier)
    return uris[0] if len(uris) == 1 and uris[0].startswith("spiffe://") else None
