"""Who is on the other end of an xDS stream: the server's view of authentication.

The server speaks TLS only, with the credentials an :class:`Authenticator` gives it, and asks
the same authenticator which node the peer of each call is. Every DiscoveryRequest that carries
a node must then name that same node (:func:`check_node`). Refusals are :class:`Refused`:
``UNAUTHENTICATED`` (no usable credential) or ``PERMISSION_DENIED`` (a credential for another
node), counted by reason (:data:`REASONS`) and logged with the claimed node id escaped
(:func:`record`): every refusal is counted, but at most :data:`LOG_PER_SECOND` lines per reason
are logged each second (:class:`RefusalLog`), so one client cannot flood the log.

The mesh's implementation (enrolment credentials signed by the xDS root) is
:class:`legation.certs.xds_auth.XdsAuth`; the control plane hands it to the server.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

import grpc

from legation.xds._escape import escaped
from legation.xds.metrics import XdsMetrics

__all__ = [
    "LOG_PER_SECOND",
    "REASONS",
    "Authenticator",
    "RefusalLog",
    "Refused",
    "channel_credentials",
    "check_node",
    "record",
]

log = logging.getLogger("legation.xds.auth")

#: The bounded set of refusal reasons (metric label values).
REASONS = (
    "no_credential",
    "bad_credential",
    "not_a_node",
    "expired",
    "superseded",
    "node_mismatch",
)

#: Refusal lines logged per reason per second at most (the metric counts every refusal).
LOG_PER_SECOND = 10


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

    def rechecker(self, context: Any) -> Callable[[], object]:
        """For an open stream whose peer :meth:`peer_node` accepted: a callable the server runs
        before each push and at least every 30 s, raising :class:`Refused` once the credential
        is revoked or expired. It should be cheap (the certificate does not change)."""
        ...


def check_node(credential: str, claimed: str) -> None:
    """A request's node id must be the credential's."""
    if claimed != credential:
        raise Refused(
            "node_mismatch",
            grpc.StatusCode.PERMISSION_DENIED,
            "node.id does not match the client certificate",
        )


class RefusalLog:
    """Which refusals to log: at most ``per_second`` per reason in each one-second window; the
    number left out is reported with the next line logged for that reason."""

    def __init__(
        self, *, per_second: int = LOG_PER_SECOND, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.per_second = per_second
        self.clock = clock
        self._windows: dict[str, tuple[float, int, int]] = {}  # reason -> start, logged, left out

    def admit(self, reason: str) -> tuple[bool, int]:
        """(log this refusal?, how many of this reason were left out before it)."""
        now = self.clock()
        start, logged, left_out = self._windows.get(reason, (now, 0, 0))
        if now - start >= 1.0:
            start, logged = now, 0
        if logged < self.per_second:
            self._windows[reason] = (start, logged + 1, 0)
            return True, left_out
        self._windows[reason] = (start, logged, left_out + 1)
        return False, 0


_refusal_log = RefusalLog()


def record(
    metrics: XdsMetrics,
    refused: Refused,
    *,
    claimed: str,
    peer: str,
    limiter: RefusalLog | None = None,
) -> None:
    """Count a refusal by reason and log it (rate-limited per reason), the claimed node id
    escaped."""
    metrics.auth_refused.labels(refused.reason).inc()
    limiter = limiter or _refusal_log
    logged, left_out = limiter.admit(refused.reason)
    if left_out:
        log.warning(
            "xDS refused %d more calls for %s (not logged one by one: at most %d lines "
            "per reason per second; the metric counts all)",
            left_out,
            refused.reason,
            limiter.per_second,
        )
    if logged:
        log.warning(
            "xDS refused %s from %s claiming node %s: %s",
            refused.reason,
            escaped(peer, 80),
            escaped(claimed),
            refused.message,
        )


def channel_credentials(
    cert_pem: bytes, key_pem: bytes, root_pem: bytes
) -> grpc.ChannelCredentials:
    """What a (non-Envoy) client presents: its client certificate, trusting only ``root_pem``."""
    return grpc.ssl_channel_credentials(
        root_certificates=root_pem, private_key=key_pem, certificate_chain=cert_pem
    )
