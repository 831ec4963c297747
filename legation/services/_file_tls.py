"""The service process's side of mTLS under ``legation up``: the certificate files the control
plane writes beside the plan (:mod:`legation.services.published`), read before each handshake."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from legation.grpc_server import ServerTls

log = logging.getLogger("legation.services.published")

CERT_FILE, KEY_FILE, CA_FILE = "cert.pem", "key.pem", "ca.pem"

__all__ = ["CA_FILE", "CERT_FILE", "KEY_FILE", "FileTls"]


class FileTls:
    """The service process's side: a :data:`~legation.grpc_server.TlsSource` reading the
    certificate files of ``directory`` (only when they changed; the same object otherwise). A
    certificate that does not match its key (caught between two renames) is not served: the
    current one stays until the next handshake finds the pair whole."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._stamp: tuple[tuple[int, int, int], ...] = ()
        self._current: ServerTls | None = None

    def __call__(self) -> ServerTls | None:
        paths = [self.directory / name for name in (CERT_FILE, KEY_FILE, CA_FILE)]
        try:
            stamp = tuple((s.st_ino, s.st_mtime_ns, s.st_size) for s in map(os.stat, paths))
        except OSError:
            return self._current
        if stamp == self._stamp:
            return self._current
        try:
            cert, key, ca = (p.read_bytes() for p in paths)
            leaf = x509.load_pem_x509_certificate(cert)
            private = serialization.load_pem_private_key(key, password=None)
            if private.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            ) != leaf.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            ):
                return self._current  # mid-renewal: try again at the next handshake
            tls = ServerTls(cert_chain_pem=cert, key_pem=key, client_ca_pem=ca)
        except (OSError, ValueError) as err:
            log.warning(
                "cannot read the certificate in %s (%s); keeping the current one",
                self.directory,
                err,
            )
            return self._current
        self._stamp, self._current = stamp, tls
        return tls
