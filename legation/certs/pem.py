"""Reading a CA's PEM files, with errors that name the file and never quote it, and describing a
root certificate (``legation ca show``) from the certificate alone."""

from __future__ import annotations

from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from legation.certs.errors import CertError

MIN_RSA_BITS = 2048
SigningKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def describe_root(cert_path: Path) -> dict[str, str]:
    """A root certificate's subject, SHA-256 fingerprint and validity (``legation ca show``);
    reads only the certificate, never the key."""
    cert = _read_cert(cert_path)
    return {
        "certificate": str(cert_path),
        "subject": cert.subject.rfc4514_string(),
        "fingerprint_sha256": cert.fingerprint(hashes.SHA256()).hex(":").upper(),
        "not_before": cert.not_valid_before_utc.isoformat(),
        "not_after": cert.not_valid_after_utc.isoformat(),
    }


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise CertError(
            f"{path}: cannot read: {err.strerror or err}", code="ca_unreadable"
        ) from None


def _read_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(_read(path))
    except ValueError:
        raise CertError(f"{path}: not a PEM certificate", code="ca_unreadable") from None


def _read_key(path: Path) -> SigningKey:
    try:
        key = serialization.load_pem_private_key(_read(path), password=None)
    except (ValueError, TypeError):
        # the parser's message is not repeated: it could quote the file
        raise CertError(
            f"{path}: not an unencrypted PEM private key", code="ca_unreadable"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise CertError(f"{path}: the CA key must be EC or RSA", code="ca_invalid")
    if isinstance(key, rsa.RSAPrivateKey) and key.key_size < MIN_RSA_BITS:
        raise CertError(
            f"{path}: the RSA CA key has {key.key_size} bits; at least {MIN_RSA_BITS} are needed",
            code="ca_invalid",
        )
    return key
