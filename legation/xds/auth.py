"""Who is on the other end of an xDS stream: the server's view of authentication.

The server speaks TLS only, with the credentials an :class:`Authenticator` gives it, and asks
the same authenticator which node the peer of each call is. Every DiscoveryRequest that carries
a node must then name that same node (:func:`check_node`). Refusals are :class:`Refused`:
``UNAUTHENTICATED`` (no usable credential) or ``PERMISSION_DENIED`` (a credential for another
node), counted by reason (:data:`REASONS`) and logged with the claimed node id escaped
(:func:`record`).

The mesh's implementation (enrolment credentials signed by the mesh CA) is
:class:`legation.certs.xds_auth.XdsAuth`; the control plane hands it to the server.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

import grpc

from legation.xds._escape import escaped
from legation.xds.metrics import XdsMetrics

__all__ = ["REASONS", "Authenticator", "Refused", "channel_credentials", "check_node", "record"]

log = logging.getLogger("legation.xds.auth")

#: The bounded set of refusal reasons (metric label values).
REASONS = ("no_credential", "bad_credential", "not_a_node", "expired", "superseded",
           "node_mismatch")


class Refused(Exception):
    """A stream or fetch is refused; ``reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: str, status: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.status = status
        self.message = message


class Authenticator(Protocol):
    """The xDS server's TLS material and its per-call identity check."""

    def server_credentials(self) -> grpc.ServerCredentials:
        """The credentials the server's port is bound with, asked for once when it starts.

        They must require a client certificate: xDS hands out private keys (SDS), so an
        unauthenticated peer must not get past the handshake. Re-issuing the serving
        certificate is the credentials' business (gRPC may ask for it on every handshake)."""
        ...

    def peer_node(self, context: Any) -> str:
        """The node id that the peer's credential names, for a call's ``context``.

        Called once per stream or fetch, before any resource is sent; every request's
        ``node.id`` on that call is then held to it (:func:`check_node`). Raises
        :class:`Refused` (with one of :data:`REASONS`) when the peer has no credential, one
        that is not a node's, or one that has expired or been superseded."""
        ...


def check_node(credential: str, claimed: str) -> None:
    """A request's node id must be the credential's."""
    if claimed != credential:
        raise Refused("node_mismatch", grpc.StatusCode.PERMISSION_DENIED,
                      "node.id does not match the client certificate")


def record(metrics: XdsMetrics, refused: Refused, *, claimed: str, peer: str) -> None:
    """Count a refusal by reason and log it, the claimed node id escaped."""
    metrics.auth_refused.labels(refused.reason).inc()
    log.warning("xDS refused %s from %s claiming node %s: %s", refused.reason,
                escaped(peer, 80), escaped(claimed), refused.message)


def channel_credentials(cert_pem: bytes, key_pem: bytes, root_pem: bytes
                        ) -> grpc.ChannelCredentials:
    """What a (non-Envoy) client presents: its client certificate, trusting only ``root_pem``."""
    return grpc.ssl_channel_credentials(root_certificates=root_pem, private_key=key_pem,
                                        certificate_chain=cert_pem)
