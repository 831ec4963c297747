"""The mesh's certificate authority: a root (self-signed, generated once and kept on disk, or
loaded from configured PEM files) that signs short-lived SPIFFE workload certificates.

Generated roots are EC P-256, valid ten years, stored as ``ca.crt`` (0644) and ``ca.key`` (0600) in
a directory created 0700 (an existing one must be this user's and writable by no one else), under a
lock and without ever replacing a file, so concurrent first uses share one root. The xDS root
(:func:`legation.certs.enrol.xds_root`) is another instance, kept the same way. Workload
certificates are X509-SVIDs: EC P-256 keys, the SPIFFE id as the only URI SAN, ``digitalSignature``
only, server and client auth, signed by the root directly (the chain is the leaf; the trust bundle
is the root).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from legation.certs._files import (
    check_private_key_file,
    exclusive_lock,
    private_dir,
    write_new_private,
)
from legation.certs.errors import CertError
from legation.certs.pem import SigningKey, _read_cert, _read_key
from legation.certs.workload import WorkloadCert

CERT_FILE = "ca.crt"
KEY_FILE = "ca.key"
LOCK_FILE = ".ca.lock"
ROOT_VALIDITY = timedelta(days=3650)
CLOCK_SKEW = timedelta(minutes=1)  # workload certs start this much in the past


class CertificateAuthority:
    """A root certificate and its key. ``source`` says where it came from (for messages)."""

    def __init__(self, cert: x509.Certificate, key: SigningKey, *, source: str) -> None:
        self.cert = cert
        self._key = key
        self.source = source
        self.root_pem = cert.public_bytes(serialization.Encoding.PEM)

    def __repr__(self) -> str:
        return f"CertificateAuthority({self.source!r}, fingerprint={self.fingerprint!r})"

    # -- what it is ------------------------------------------------------------------------

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the root, ``AB:CD:...`` as ``openssl x509 -fingerprint -sha256`` prints."""
        return self.cert.fingerprint(hashes.SHA256()).hex(":").upper()

    @property
    def not_after(self) -> datetime:
        return self.cert.not_valid_after_utc

    # -- making and finding one --------------------------------------------------------------

    @classmethod
    def generate(
        cls, *, trust_domain: str, now: datetime | None = None, label: str = ""
    ) -> CertificateAuthority:
        """A new root; ``label`` (a rotated root's) ends its common name, so that two roots of
        one mesh never share a subject."""
        now = now or datetime.now(UTC)
        common = f"Legation root CA {trust_domain}"[: 63 - len(label)] + (
            f" {label}" if label else ""
        )
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Legation"),
                x509.NameAttribute(NameOID.COMMON_NAME, common[:64]),
            ]
        )
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(now + ROOT_VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_usage(cert_sign=True), critical=True)
            .add_extension(ski, critical=False)
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]
                ),
                critical=False,
            )
            .sign(key, hashes.SHA256())
        )
        return cls(cert, key, source="generated")

    @classmethod
    def load(cls, cert_path: Path, key_path: Path) -> CertificateAuthority:
        """A CA from PEM files; raises ``ca_unreadable``, ``ca_insecure`` (the key file is
        accessible to group or others) or ``ca_invalid``."""
        cert = _read_cert(cert_path)
        check_private_key_file(key_path)
        key = _read_key(key_path)
        ca = cls(cert, key, source=f"{cert_path} + {key_path}")
        ca._check(cert_path, key_path)
        return ca

    @classmethod
    def in_directory(cls, directory: Path, *, trust_domain: str) -> CertificateAuthority:
        """The CA kept in ``directory``; generated and stored there on first use.

        The directory must be this user's and writable by no one else. Creation holds a lock
        (``.ca.lock``) and never replaces a file (the key is hard-linked into place), so two
        processes opening a new directory at once end up with the same CA: the one on disk,
        which both read back."""
        cert_path, key_path = directory / CERT_FILE, directory / KEY_FILE
        try:
            private_dir(directory)
            # anything short of both files: wait on the lock, so a CA another process is
            # still writing (key stored, certificate not yet) is read only once it is whole
            if not (cert_path.exists() and key_path.exists()):
                with exclusive_lock(directory / LOCK_FILE):
                    if not (cert_path.exists() or key_path.exists()):
                        try:
                            cls.generate(trust_domain=trust_domain)._store(directory)
                        except FileExistsError:
                            pass  # a writer that takes no lock got there first: theirs stands
        except OSError as err:
            raise CertError(
                f"{directory}: cannot store the new CA: {err.strerror or err}",
                code="ca_write_failed",
            ) from None
        ca = cls.load(cert_path, key_path)
        ca.source = str(directory)
        return ca

    def _store(
        self, directory: Path, *, cert_name: str = CERT_FILE, key_name: str = KEY_FILE
    ) -> None:
        """Write the key, then the certificate; neither replaces an existing file."""
        key_pem = self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        write_new_private(directory / key_name, key_pem, 0o600)
        write_new_private(directory / cert_name, self.root_pem, 0o644)

    def _check(self, cert_path: Path, key_path: Path) -> None:
        try:
            constraints = self.cert.extensions.get_extension_for_class(x509.BasicConstraints)
            is_ca = constraints.value.ca
        except x509.ExtensionNotFound:
            is_ca = False
        if not is_ca:
            raise CertError(f"{cert_path}: not a CA certificate", code="ca_invalid")
        if self.not_after <= datetime.now(UTC):
            raise CertError(f"{cert_path}: expired on {self.not_after:%Y-%m-%d}", code="ca_invalid")
        public = serialization.PublicFormat.SubjectPublicKeyInfo
        mine = self._key.public_key().public_bytes(serialization.Encoding.DER, public)
        theirs = self.cert.public_key().public_bytes(serialization.Encoding.DER, public)
        if mine != theirs:
            raise CertError(f"{key_path}: does not match {cert_path}", code="ca_invalid")

    # -- issuing -----------------------------------------------------------------------------

    def issue(self, spiffe_id: str, *, ttl: timedelta, now: datetime | None = None) -> WorkloadCert:
        """A fresh key and certificate for ``spiffe_id``, valid ``ttl`` from ``now`` (never past
        the root's own expiry); server and client auth (mesh mTLS goes both ways)."""
        return self.issue_leaf(
            spiffe_id,
            ttl=ttl,
            now=now,
            usages=(ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH),
        )

    def issue_leaf(
        self,
        uri: str,
        *,
        ttl: timedelta,
        usages: Sequence[x509.ObjectIdentifier],
        hosts: Sequence[str] = (),
        common_name: str | None = None,
        now: datetime | None = None,
    ) -> WorkloadCert:
        """A fresh EC P-256 key and a certificate whose SANs are the URI ``uri`` and ``hosts``
        (IP addresses as IP SANs, names as DNS SANs), for the extended key ``usages``."""
        now = (now or datetime.now(UTC)).replace(microsecond=0)  # X.509 keeps whole seconds
        key = ec.generate_private_key(ec.SECP256R1())
        not_before = max(now - CLOCK_SKEW, self.cert.not_valid_before_utc)
        not_after = min(now + ttl, self.not_after)
        serial = x509.random_serial_number()
        name = common_name or uri.rsplit("/", 1)[-1][:64] or "workload"
        issuer_ski = self.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
        sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(uri)]
        for host in hosts:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                sans.append(x509.DNSName(host))
        cert = (
            x509.CertificateBuilder()
            .subject_name(
                x509.Name(
                    [
                        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Legation"),
                        x509.NameAttribute(NameOID.COMMON_NAME, name[:64]),
                    ]
                )
            )
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(serial)
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_usage(cert_sign=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage(list(usages)), critical=False)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(issuer_ski.value),
                critical=False,
            )
            .sign(self._key, hashes.SHA256())
        )
        return WorkloadCert(
            spiffe_id=uri,
            cert_pem=cert.public_bytes(serialization.Encoding.PEM),
            key_pem=key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
            serial=serial,
            issued_at=now,
            not_before=not_before,
            not_after=not_after,
        )


def _usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )
