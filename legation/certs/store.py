"""Issued certificates kept beside the CA, so a restarted control plane re-uses them.

Without it every restart would issue every proxy and service a new certificate and push every
SDS secret again, although nothing changed. :class:`CertStore` keeps each current certificate
with its key as one JSON file (0600, written by atomic rename) in a 0700 directory next to the
CA (``<CA dir>/issued/``). :meth:`CertStore.load` hands one back only when it is still good for
the asking issuer: signed by that CA, the expected SPIFFE id (and host names, for a service),
its key matching, its extended key usages those asked for, and not expired; anything else is
ignored and the caller issues a new one.
"""

from __future__ import annotations

import json
import logging
import urllib.parse
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from legation.certs._files import private_dir, write_private
from legation.certs.ca import CertificateAuthority
from legation.certs.errors import CertError
from legation.certs.workload import WorkloadCert

log = logging.getLogger("legation.certs.store")

__all__ = ["CertStore"]

SUFFIX = ".json"


class CertStore:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._saved: dict[str, int] = {}  # name -> serial written

    def _path(self, name: str) -> Path:
        return self.directory / (urllib.parse.quote(name, safe="-_~") + SUFFIX)

    def load(
        self,
        name: str,
        *,
        ca: CertificateAuthority,
        spiffe_id: str,
        now: datetime,
        hosts: tuple[str, ...] | None = None,
        usages: Iterable[x509.ObjectIdentifier] = (),
    ) -> WorkloadCert | None:
        """The stored certificate ``name`` if it is still good (see the module docstring)."""
        try:
            raw = json.loads(self._path(name).read_text())
            cert_pem, key_pem = raw["cert_pem"].encode(), raw["key_pem"].encode()
            cert = x509.load_pem_x509_certificate(cert_pem)
            key = serialization.load_pem_private_key(key_pem, password=None)
            cert.verify_directly_issued_by(ca.cert)
            sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            uris = sans.get_values_for_type(x509.UniformResourceIdentifier)
            held_hosts = tuple(
                str(n.value) for n in sans if isinstance(n, x509.DNSName | x509.IPAddress)
            )
            spki = serialization.PublicFormat.SubjectPublicKeyInfo
            same_key = key.public_key().public_bytes(
                serialization.Encoding.DER, spki
            ) == cert.public_key().public_bytes(serialization.Encoding.DER, spki)
            issued_at = datetime.fromisoformat(raw["issued_at"])
            held_usages = set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, x509.ExtensionNotFound) as err:
            log.info("stored certificate %s not re-used: %s", name, err or type(err).__name__)
            return None
        except Exception as err:  # a signature from another CA: cryptography's InvalidSignature
            log.info("stored certificate %s not re-used: %s", name, type(err).__name__)
            return None
        if (
            uris != [spiffe_id]
            or not same_key
            or now >= cert.not_valid_after_utc
            or (hosts is not None and held_hosts != hosts)
            or not set(usages) <= held_usages
        ):
            return None
        self._saved[name] = cert.serial_number
        return WorkloadCert(
            spiffe_id=spiffe_id,
            cert_pem=cert_pem,
            key_pem=key_pem,
            serial=cert.serial_number,
            issued_at=issued_at,
            not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc,
        )

    def save(self, certs: dict[str, WorkloadCert]) -> None:
        """Keep exactly ``certs`` (name -> certificate): write the new ones, remove the files of
        names no longer held. Errors are logged: the certificates in memory still serve."""
        try:
            private_dir(self.directory)
            for name, cert in certs.items():
                if self._saved.get(name) != cert.serial:
                    write_private(
                        self._path(name),
                        json.dumps(
                            {
                                "spiffe_id": cert.spiffe_id,
                                "cert_pem": cert.cert_pem.decode(),
                                "key_pem": cert.key_pem.decode(),
                                "issued_at": cert.issued_at.isoformat(),
                            }
                        ).encode(),
                    )
                    self._saved[name] = cert.serial
            self._prune(set(certs))
        except (OSError, CertError) as err:
            log.warning("cannot keep the issued certificates in %s: %s", self.directory, err)

    def _prune(self, keep: Iterable[str]) -> None:
        wanted = {self._path(n).name for n in keep}
        for path in self.directory.glob("*" + SUFFIX):
            if path.name not in wanted:
                path.unlink(missing_ok=True)
        self._saved = {n: s for n, s in self._saved.items() if self._path(n).name in wanted}
