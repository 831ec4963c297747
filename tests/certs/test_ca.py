"""The CA: generated and kept on disk (key 0600), loaded from PEM files, issuing X509-SVIDs that
verify against the root with cryptography's own path validation."""

from __future__ import annotations

import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from legation.certs import CertError, CertificateAuthority, spiffe_id

SID = "spiffe://cluster.local/ns/default/sa/reviews"


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.generate(trust_domain="cluster.local")


def leaf(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem)


def test_spiffe_id_scheme() -> None:
    assert spiffe_id("cluster.local", "default", "reviews") == SID
    for bad in (("Cluster", "default", "x"), ("td", "a/b", "x"), ("td", "ns", "..")):
        with pytest.raises(CertError) as info:
            spiffe_id(*bad)
        assert info.value.code == "bad_identity"


def test_root_is_a_ca_valid_for_years(ca: CertificateAuthority) -> None:
    root = ca.cert
    assert root.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    usage = root.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign
    assert ca.not_after - datetime.now(UTC) > timedelta(days=3000)
    assert ca.fingerprint == root.fingerprint(hashes.SHA256()).hex(":").upper()
    assert "PRIVATE" not in repr(ca) and ca.fingerprint in repr(ca)


def test_workload_cert_is_an_svid(ca: CertificateAuthority) -> None:
    now = datetime.now(UTC)
    cert = ca.issue(SID, ttl=timedelta(hours=24), now=now)
    c = leaf(cert.cert_pem)
    sans = c.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.UniformResourceIdentifier) == [SID]
    assert len(list(sans)) == 1
    assert c.not_valid_after_utc == cert.not_after
    assert c.not_valid_after_utc - now.replace(microsecond=0) == timedelta(hours=24)
    assert c.not_valid_before_utc <= now
    assert isinstance(c.public_key(), ec.EllipticCurvePublicKey)
    assert c.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]
    basic = c.extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical and basic.value.ca is False
    usage = c.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.digital_signature
    assert not usage.value.key_cert_sign and not usage.value.crl_sign
    eku = c.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert c.serial_number == cert.serial and cert.serial_hex == format(cert.serial, "x")
    # the key belongs to the certificate
    key = serialization.load_pem_private_key(cert.key_pem, password=None)
    assert key.public_key() == c.public_key()
    # never in repr or the status summary
    assert "PRIVATE KEY" not in repr(cert) and "PRIVATE KEY" not in str(cert.summary())
    assert cert.summary()["spiffe_id"] == SID


def test_chain_verifies_against_the_root_and_not_another(ca: CertificateAuthority) -> None:
    cert = ca.issue(SID, ttl=timedelta(hours=1))
    verifier = PolicyBuilder().store(Store([ca.cert])).build_client_verifier()
    verified = verifier.verify(leaf(cert.cert_pem), [])
    assert verified.chain[-1] == ca.cert
    assert [str(s.value) for s in verified.subjects or []] == [SID]
    other = CertificateAuthority.generate(trust_domain="cluster.local")
    stranger = PolicyBuilder().store(Store([other.cert])).build_client_verifier()
    with pytest.raises(VerificationError):
        stranger.verify(leaf(cert.cert_pem), [])


def test_renewal_at_two_thirds(ca: CertificateAuthority) -> None:
    now = datetime(2030, 1, 1, tzinfo=UTC)
    cert = ca.issue(SID, ttl=timedelta(hours=3), now=now)
    assert cert.renew_at == now + timedelta(hours=2)
    assert not cert.due(now + timedelta(hours=1, minutes=59))
    assert cert.due(now + timedelta(hours=2))


def test_never_outlives_the_root(ca: CertificateAuthority) -> None:
    cert = ca.issue(SID, ttl=timedelta(days=365 * 20))
    assert cert.not_after == ca.not_after


def test_generated_once_in_a_directory_key_0600(tmp_path: Path) -> None:
    where = tmp_path / "state" / "ca"
    first = CertificateAuthority.in_directory(where, trust_domain="example.org")
    assert stat.S_IMODE((where / "ca.key").stat().st_mode) == 0o600
    assert stat.S_IMODE(where.stat().st_mode) == 0o700
    assert (where / "ca.crt").read_bytes() == first.root_pem
    again = CertificateAuthority.in_directory(where, trust_domain="example.org")
    assert again.fingerprint == first.fingerprint
    # what it issues verifies against the stored root
    cert = again.issue(SID, ttl=timedelta(hours=1))
    root = x509.load_pem_x509_certificate((where / "ca.crt").read_bytes())
    PolicyBuilder().store(Store([root])).build_client_verifier().verify(leaf(cert.cert_pem), [])


def test_loaded_from_pem_files(tmp_path: Path, ca: CertificateAuthority) -> None:
    CertificateAuthority.in_directory(tmp_path, trust_domain="x")
    loaded = CertificateAuthority.load(tmp_path / "ca.crt", tmp_path / "ca.key")
    assert loaded.source == f"{tmp_path / 'ca.crt'} + {tmp_path / 'ca.key'}"


def test_bad_ca_files_have_stable_codes(tmp_path: Path) -> None:
    CertificateAuthority.in_directory(tmp_path / "a", trust_domain="x")
    CertificateAuthority.in_directory(tmp_path / "b", trust_domain="x")
    (tmp_path / "junk.pem").write_text("not pem")
    (tmp_path / "junk.pem").chmod(0o600)  # a key file that only its owner reads, but junk
    cases = [
        (tmp_path / "missing.crt", tmp_path / "a" / "ca.key", "ca_unreadable", "cannot read"),
        (tmp_path / "junk.pem", tmp_path / "a" / "ca.key", "ca_unreadable", "not a PEM cert"),
        (tmp_path / "a" / "ca.crt", tmp_path / "junk.pem", "ca_unreadable", "not an unencry"),
        (tmp_path / "a" / "ca.crt", tmp_path / "b" / "ca.key", "ca_invalid", "does not match"),
    ]
    for cert_path, key_path, code, words in cases:
        with pytest.raises(CertError) as info:
            CertificateAuthority.load(cert_path, key_path)
        assert info.value.code == code, (cert_path, key_path)
        assert words in str(info.value)
        assert "BEGIN" not in str(info.value)
    # a workload certificate is not a CA
    ca = CertificateAuthority.load(tmp_path / "a" / "ca.crt", tmp_path / "a" / "ca.key")
    issued = ca.issue(SID, ttl=timedelta(hours=1))
    (tmp_path / "leaf.crt").write_bytes(issued.cert_pem)
    (tmp_path / "leaf.key").write_bytes(issued.key_pem)
    (tmp_path / "leaf.key").chmod(0o600)
    with pytest.raises(CertError) as info:
        CertificateAuthority.load(tmp_path / "leaf.crt", tmp_path / "leaf.key")
    assert (info.value.code, str(info.value)) == (
        "ca_invalid",
        f"{tmp_path / 'leaf.crt'}: not a CA certificate",
    )
    # half a directory is an error, not a silent new CA
    (tmp_path / "a" / "ca.key").unlink()
    with pytest.raises(CertError) as info:
        CertificateAuthority.in_directory(tmp_path / "a", trust_domain="x")
    assert info.value.code == "ca_unreadable"


def test_cli_ca_show_prints_fingerprint_and_expiry(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from legation.cli import main

    ca = CertificateAuthority.in_directory(tmp_path, trust_domain="cluster.local")
    assert main(["ca", "show", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"fingerprint_sha256  {ca.fingerprint}" in out
    assert f"not_after           {ca.not_after.isoformat()}" in out
    assert "PRIVATE" not in out
    assert main(["ca", "show", str(tmp_path / "none")]) == 1
    assert "cannot read" in capsys.readouterr().err


def test_a_key_readable_by_group_or_others_is_refused_naming_the_file(tmp_path: Path) -> None:
    CertificateAuthority.in_directory(tmp_path, trust_domain="x")
    key = tmp_path / "ca.key"
    for mode in (0o640, 0o604, 0o660):
        key.chmod(mode)
        with pytest.raises(CertError) as info:
            CertificateAuthority.in_directory(tmp_path, trust_domain="x")
        assert info.value.code == "ca_insecure"
        assert str(info.value).startswith(f"{key}: the CA key is accessible to group or others")
        assert f"chmod 600 {key}" in str(info.value)
    key.chmod(0o400)
    CertificateAuthority.in_directory(tmp_path, trust_domain="x")


def test_a_small_rsa_ca_key_is_refused(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    def rsa_ca(bits: int, name: str) -> tuple[Path, Path]:
        key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.now(UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(1)
            .not_valid_before(now - timedelta(minutes=1))
            .not_valid_after(now + timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .sign(key, hashes.SHA256())
        )
        cert_path, key_path = tmp_path / f"{name}.crt", tmp_path / f"{name}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        key_path.chmod(0o600)
        return cert_path, key_path

    small = rsa_ca(1024, "small")
    with pytest.raises(CertError) as info:
        CertificateAuthority.load(*small)
    assert (info.value.code, str(info.value)) == (
        "ca_invalid",
        f"{small[1]}: the RSA CA key has 1024 bits; at least 2048 are needed",
    )
    CertificateAuthority.load(*rsa_ca(2048, "big"))


def test_key_files_are_written_exclusively_never_through_a_planted_link(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    from legation.certs import _files

    opened: list[int] = []
    locks: list[int] = []
    real_open = os.open

    def spy(path: object, flags: int, *args: object) -> int:
        (locks if str(path).endswith(".lock") else opened).append(flags)
        return real_open(path, flags, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(_files.os, "open", spy)
    CertificateAuthority.in_directory(tmp_path / "ca", trust_domain="x")
    assert opened and all(f & os.O_EXCL and f & os.O_NOFOLLOW and f & os.O_CREAT for f in opened)
    assert locks and all(f & os.O_NOFOLLOW for f in locks)  # the lock file holds no secret
    # a symlink planted where the temporary file would go is not followed
    target = tmp_path / "victim"
    target.write_text("untouched")
    monkeypatch.setattr(_files.secrets, "token_hex", lambda n: "fixed")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / ".k.pem.fixed.tmp").symlink_to(target)
    with pytest.raises(FileExistsError):
        _files.write_private(tmp_path / "out" / "k.pem", b"secret")
    assert target.read_text() == "untouched"
    assert not (tmp_path / "out" / "k.pem").exists()
