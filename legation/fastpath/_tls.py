"""Mutual TLS for the HTTP call-out server, following a certificate source like the gRPC services.

:func:`server_context` turns a :class:`~legation.grpc_server.ServerTls` (or a
:data:`~legation.grpc_server.TlsSource`, asked before every handshake) into the
``ssl.SSLContext`` asyncio serves with: the server presents the certificate and, with
``require_client_auth`` (the default), accepts only clients whose certificate chains to
``client_ca_pem`` (in a mesh, the proxies' workload certificates). A renewed certificate is
served from the next handshake on, as :func:`legation.grpc_server.server_credentials` does for
gRPC; open connections carry on. ALPN offers ``http/1.1`` only.

Python's ``ssl`` loads a certificate and key from files only: each new certificate is written to
a private temporary folder (0700, files 0600), loaded, and removed at once.
"""

from __future__ import annotations

import logging
import os
import ssl
import tempfile
import threading
from pathlib import Path
from typing import Any

from legation.grpc_server import ServerTls, TlsSource

log = logging.getLogger("legation.fastpath")

__all__ = ["server_context"]


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _context(tls: ServerTls) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    with tempfile.TemporaryDirectory(prefix="legation-tls-") as folder:
        cert, key = Path(folder) / "cert.pem", Path(folder) / "key.pem"
        _write_private(cert, tls.cert_chain_pem)
        _write_private(key, tls.key_pem)
        ctx.load_cert_chain(cert, key)
    ctx.load_verify_locations(cadata=tls.client_ca_pem.decode("ascii"))
    ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_client_auth else ssl.CERT_NONE
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


class _Following:
    """The context of the source's current certificate, switched to on each handshake (the
    server-name callback runs for every ClientHello, with or without SNI)."""

    def __init__(self, source: TlsSource, first: ServerTls) -> None:
        self._source = source
        self._current = first
        self._ctx = _context(first)
        self._lock = threading.Lock()

    def pick(self, sslobj: ssl.SSLObject, server_name: str | None, _ctx: Any) -> None:
        try:
            latest = self._source()
        except Exception:  # a failing source must not break handshakes: keep the current one
            log.exception("TLS certificate source failed; serving the current certificate")
            latest = None
        with self._lock:
            if (
                latest is not None
                and latest is not self._current
                and latest.require_client_auth == self._current.require_client_auth
            ):
                try:
                    self._ctx = _context(latest)
                    self._current = latest
                except (ssl.SSLError, OSError, ValueError):
                    log.exception("new TLS certificate unusable; serving the current one")
            sslobj.context = self._ctx


def server_context(tls: ServerTls | TlsSource) -> ssl.SSLContext:
    """The context to pass to ``loop.create_server(ssl=...)``."""
    if isinstance(tls, ServerTls):
        return _context(tls)
    first = tls()
    if first is None:
        raise ValueError("the TLS source has no certificate yet")
    following = _Following(tls, first)
    outer = _context(first)
    outer.sni_callback = following.pick  # type: ignore[assignment]
    return outer
