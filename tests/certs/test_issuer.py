"""MeshIssuer: one certificate per proxy, kept across reloads, re-issued when an identity
changes, renewed at 2/3 of its lifetime (driven by a settable clock, never by waiting)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from legation.certs import CertError, CertificateAuthority, MeshIssuer
from tests.config.meshdata import base, parse


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2030, 6, 1, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


def mesh(**mtls: Any) -> Any:
    data = base()
    data["mtls"] = {"mode": "strict", **mtls}
    return parse(data)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def issuer(tmp_path: Path, clock: Clock) -> MeshIssuer:
    return MeshIssuer(mesh_dir=tmp_path, default_ca_dir=tmp_path / "default-ca", clock=clock)


def serials(issuer: MeshIssuer) -> dict[str, int]:
    return {n: c.serial for n, c in issuer.certs.items()}


def test_generates_the_default_ca_once(issuer: MeshIssuer, tmp_path: Path) -> None:
    issuer.update(mesh())
    assert (tmp_path / "default-ca" / "ca.key").is_file()
    assert issuer.ca is not None
    again = MeshIssuer(mesh_dir=tmp_path, default_ca_dir=tmp_path / "default-ca")
    again.update(mesh())
    assert again.ca is not None and again.ca.fingerprint == issuer.ca.fingerprint


def test_ca_dir_is_relative_to_the_mesh_and_ca_files_load(
    issuer: MeshIssuer, tmp_path: Path
) -> None:
    issuer.update(mesh(ca_dir="state/ca"))
    assert (tmp_path / "state" / "ca" / "ca.crt").is_file()
    own = CertificateAuthority.in_directory(tmp_path / "own", trust_domain="cluster.local")
    before = serials(issuer)
    issuer.update(mesh(ca_cert="own/ca.crt", ca_key="own/ca.key"))
    assert issuer.ca is not None and issuer.ca.fingerprint == own.fingerprint
    # a new CA: every certificate is re-issued by it
    assert all(serials(issuer)[n] != s for n, s in before.items())


def test_reload_keeps_certificates_unless_the_identity_changes(issuer: MeshIssuer) -> None:
    issuer.update(mesh())
    first = serials(issuer)
    issuer.update(mesh())
    assert serials(issuer) == first
    issuer.update(mesh(namespace="shop"))
    assert issuer.certs["sidecar-reviews-0"].spiffe_id == (
        "spiffe://cluster.local/ns/shop/sa/reviews"
    )
    assert all(serials(issuer)[n] != s for n, s in first.items())


def test_proxies_that_leave_lose_their_certificate(issuer: MeshIssuer) -> None:
    issuer.update(mesh())
    data = base()
    data["mtls"] = {"mode": "strict"}
    del data["services"][0]["endpoints"][1]["sidecar"]
    issuer.update(parse(data))
    assert sorted(issuer.certs) == ["gateway-ingress", "sidecar-reviews-0"]
    issuer.update(parse(base()))  # mTLS off
    assert issuer.certs == {} and issuer.secrets() is None and issuer.rotate(force=True) == []


def test_renews_at_two_thirds_of_the_lifetime(issuer: MeshIssuer, clock: Clock) -> None:
    issuer.update(mesh(cert_ttl="3h"))
    first = serials(issuer)
    assert issuer.next_renewal() == clock.now + timedelta(hours=2)
    clock.now += timedelta(hours=1, minutes=59)
    assert issuer.rotate() == [] and serials(issuer) == first
    clock.now += timedelta(minutes=1)
    assert issuer.rotate() == sorted(first)
    assert all(serials(issuer)[n] != s for n, s in first.items())
    assert issuer.next_renewal() == clock.now + timedelta(hours=2)
    renewed = issuer.certs["sidecar-reviews-0"]
    assert renewed.not_after == clock.now + timedelta(hours=3)


def test_status_shows_identities_never_keys(issuer: MeshIssuer) -> None:
    issuer.update(mesh())
    status = issuer.status()
    assert status is not None and issuer.ca is not None
    assert status["ca"]["fingerprint_sha256"] == issuer.ca.fingerprint
    assert status["proxies"]["gateway-ingress"]["spiffe_id"] == (
        "spiffe://cluster.local/ns/default/sa/ingress"
    )
    assert "PRIVATE" not in repr(status) and "PRIVATE" not in repr(issuer.certs)


def test_a_bad_ca_changes_nothing(issuer: MeshIssuer, tmp_path: Path) -> None:
    issuer.update(mesh())
    first = serials(issuer)
    (tmp_path / "bad.crt").write_text("nope")
    (tmp_path / "bad.key").write_text("nope")
    with pytest.raises(CertError) as info:
        issuer.update(mesh(ca_cert="bad.crt", ca_key="bad.key"))
    assert info.value.code == "ca_unreadable"
    assert serials(issuer) == first and issuer.enabled
