"""Binding and starting a request-path service's grpc.aio server, in plaintext or mutual TLS.

ext_authz, ext_proc and the rate-limit service all start through :func:`start_grpc_server`, so a
port that cannot be bound is the same :class:`BindError` (naming the service and the address)
whichever service it is, and TLS is set up the same way for all three.

TLS (:class:`ServerTls`): the server presents ``cert_chain_pem``/``key_pem`` and, with
``require_client_auth`` (the default), accepts only clients whose certificate chains to
``client_ca_pem``. In a mesh with mTLS on, the control plane hands its embedded services a
certificate from the mesh CA, so only the mesh's proxies (which hold workload certificates from
the same CA) can call them. Pass a :data:`TlsSource` instead of a fixed :class:`ServerTls` to
rotate without restarting: gRPC asks the source before every new connection's handshake (on one
of its own threads), so a renewed certificate is served from the next connection on while open
connections and their in-flight requests carry on.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from legation.errors import LegationError

__all__ = ["BindError", "ServerTls", "TlsSource", "server_credentials", "start_grpc_server"]

log = logging.getLogger("legation.grpc_server")


@dataclass(frozen=True, kw_only=True)
class ServerTls:
    """A server certificate (PEM chain and key) and the CA that client certificates must chain
    to. The key is kept out of ``repr``."""

    cert_chain_pem: bytes = field(repr=False)
    key_pem: bytes = field(repr=False)
    client_ca_pem: bytes = field(repr=False)
    require_client_auth: bool = True

    def __post_init__(self) -> None:
        for name in ("cert_chain_pem", "key_pem", "client_ca_pem"):
            if not getattr(self, name):
                raise ValueError(f"ServerTls.{name} is empty")


TlsSource = Callable[[], ServerTls | None]
"""The current :class:`ServerTls`, asked before every handshake: return the same object while
nothing changed (a new object is a new certificate; None: keep the current one). It runs on a
gRPC thread: keep it a lookup."""


class BindError(LegationError):
    """A service's gRPC server could not listen on its address (taken, not local, bad host)."""

    code = "bind_failed"


def add_methods(server: grpc.aio.Server, service: str, handlers: dict[str, Any]) -> None:
    """Serve ``service``'s methods with ``handlers`` (name -> an ``rpc_method_handler``), as
    generated ``add_*Servicer_to_server`` code registers them: a generic handler, and the same
    methods registered with gRPC's core (grpcio >= 1.62). Measured with h2load against the
    ext_proc service, registering made no difference in service CPU per call; it is done so
    that Legation's servers are set up as the generated code would set them up."""
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
    server.add_registered_method_handlers(service, handlers)


async def start_grpc_server(
    service: str,
    register: Callable[[grpc.aio.Server], None],
    *,
    host: str,
    port: int,
    reuse_port: bool = False,
    options: Sequence[tuple[str, Any]] = (),
    tls: ServerTls | TlsSource | None = None,
) -> tuple[grpc.aio.Server, int]:
    """Build a grpc.aio server, let ``register`` add the servicer(s), bind ``host:port``
    (``port`` 0: an ephemeral port; IPv6 hosts with or without brackets), start it; return it
    with its bound port. ``options`` are gRPC channel arguments (after ``grpc.so_reuseport``).

    Raises :class:`BindError` naming ``service`` and the address when the port cannot be bound;
    the server is then not started and nothing is left listening."""
    server = grpc.aio.server(options=[("grpc.so_reuseport", 1 if reuse_port else 0), *options])
    register(server)
    address = f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"
    try:
        if tls is None:
            bound = server.add_insecure_port(address)
        else:
            bound = server.add_secure_port(address, server_credentials(tls))
    except RuntimeError as err:  # recent grpcio raises instead of returning 0
        raise BindError(f"{service}: cannot listen on {address}: {err}") from None
    if bound == 0:
        raise BindError(f"{service}: cannot listen on {address}")
    await server.start()
    return server, bound


def server_credentials(tls: ServerTls | TlsSource) -> grpc.ServerCredentials:
    """gRPC server credentials for a fixed :class:`ServerTls`, or dynamic ones following a
    :data:`TlsSource` (the client CA is part of what a rotation may change)."""
    if isinstance(tls, ServerTls):
        return grpc.ssl_server_credentials(
            [(tls.key_pem, tls.cert_chain_pem)],
            root_certificates=tls.client_ca_pem,
            require_client_auth=tls.require_client_auth,
        )
    first = tls()
    if first is None:
        raise ValueError("the TLS source has no certificate yet")
    fetcher = _Fetcher(tls, first)
    return grpc.dynamic_ssl_server_credentials(
        _configuration(first), fetcher, require_client_authentication=first.require_client_auth
    )


def _configuration(tls: ServerTls) -> Any:
    return grpc.ssl_server_certificate_configuration(
        [(tls.key_pem, tls.cert_chain_pem)], root_certificates=tls.client_ca_pem
    )


class _Fetcher:
    """gRPC's certificate-configuration fetcher: a new configuration when the source's answer
    is a different object, else None (keep serving the current one). ``require_client_auth``
    is fixed when the server starts: a source that changes it is ignored (and keeps the old)."""

    def __init__(self, source: TlsSource, first: ServerTls) -> None:
        self._source = source
        self._current = first
        self._lock = threading.Lock()  # gRPC may handshake on several threads at once

    def __call__(self) -> Any:
        try:
            latest = self._source()
        except Exception:  # a failing source must not break handshakes: keep the current one
            log.exception("TLS certificate source failed; serving the current certificate")
            return None
        with self._lock:
            if (
                latest is None
                or latest is self._current
                or (latest.require_client_auth != self._current.require_client_auth)
            ):
                return None
            self._current = latest
        return _configuration(latest)
