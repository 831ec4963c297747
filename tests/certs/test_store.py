"""Issued certificates kept beside the CA (``persist=True``): a restarted issuer re-uses the
valid ones (no new serials, so no SDS churn) and re-issues an expired one, one of another CA,
or one whose identity or host names changed."""

from __future__ import annotations

import json
import os
import stat
from datetime import timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from legation.certs import MeshIssuer
from tests.certs.test_issuer import Clock, mesh


def issuer(tmp_path: Path, clock: Clock, ca: str = "ca") -> MeshIssuer:
    return MeshIssuer(mesh_dir=tmp_path, default_ca_dir=tmp_path / ca, clock=clock, persist=True)


def held(i: MeshIssuer) -> dict[str, int]:
    return {
        **{n: c.serial for n, c in i.certs.items()},
        **{k: c.serial for k, c in i.service_certs.items()},
    }


SERVICES = {"extauthz": "127.0.0.1", "ratelimit": "localhost"}


def test_a_restart_reuses_valid_certificates(tmp_path: Path) -> None:
    clock = Clock()
    first = issuer(tmp_path, clock)
    first.update(mesh(), services=SERVICES)
    issued = held(first)
    assert len(issued) >= 4
    store = tmp_path / "ca" / "issued"
    assert stat.S_IMODE(os.stat(store).st_mode) == 0o700
    assert {stat.S_IMODE(p.stat().st_mode) for p in store.iterdir()} == {0o600}

    second = issuer(tmp_path, clock)
    second.update(mesh(), services=SERVICES)
    assert held(second) == issued
    tls = second.service_tls("extauthz")
    assert tls is not None and tls.cert_chain_pem == first.service_certs["extauthz"].cert_pem

    # a rotation is kept too
    rotated = second.rotate(force=True)
    third = issuer(tmp_path, clock)
    third.update(mesh(), services=SERVICES)
    assert {n: held(third)[n] for n in rotated} == {n: held(second)[n] for n in rotated}


def test_expired_other_ca_or_other_identity_is_reissued(tmp_path: Path) -> None:
    clock = Clock()
    first = issuer(tmp_path, clock)
    first.update(mesh(), services=SERVICES)
    issued = held(first)

    moved = issuer(tmp_path, clock)  # another host for a service: a new certificate for it
    moved.update(mesh(), services={**SERVICES, "ratelimit": "127.0.0.2"})
    assert held(moved)["ratelimit"] != issued["ratelimit"]
    assert held(moved)["extauthz"] == issued["extauthz"]

    renamed = issuer(tmp_path, clock)  # another trust domain: every identity changes
    renamed.update(mesh(trust_domain="other.test"), services=SERVICES)
    assert not set(held(renamed).values()) & set(issued.values())

    clock.now += timedelta(days=30)  # past every certificate's expiry
    later = issuer(tmp_path, clock)
    before = held(renamed)
    later.update(mesh(trust_domain="other.test"), services=SERVICES)
    assert not set(held(later).values()) & set(before.values())


def test_a_certificate_of_another_ca_or_a_damaged_file_is_not_used(tmp_path: Path) -> None:
    clock = Clock()
    first = issuer(tmp_path, clock)
    first.update(mesh())
    issued = held(first)
    other = issuer(tmp_path, clock, ca="other-ca")  # its own CA, then given the first's files
    (tmp_path / "other-ca" / "issued").mkdir(mode=0o700, parents=True)
    for path in (tmp_path / "ca" / "issued").iterdir():
        (tmp_path / "other-ca" / "issued" / path.name).write_bytes(path.read_bytes())
    other.update(mesh())
    assert not set(held(other).values()) & set(issued.values())

    some = next((tmp_path / "ca" / "issued").iterdir())
    doc: dict[str, Any] = json.loads(some.read_text())
    doc["key_pem"] = doc["key_pem"][:40]
    some.write_text(json.dumps(doc))
    again = issuer(tmp_path, clock)
    again.update(mesh())
    assert len(set(held(again).values()) - set(issued.values())) == 1


def test_a_stored_service_certificate_without_client_auth_is_reissued(tmp_path: Path) -> None:
    """Service certificates stored before they were also clients (of the trace receiver) are
    not re-used: an exporter presenting one would fail its handshake."""
    clock = Clock()
    first = issuer(tmp_path, clock)
    first.update(mesh(), services=SERVICES)
    issued = held(first)
    assert first.ca is not None
    old = first.ca.issue_leaf(
        first.service_certs["extauthz"].spiffe_id,
        ttl=timedelta(hours=1),
        now=clock.now,
        hosts=("legation-extauthz", "127.0.0.1"),
        usages=(ExtendedKeyUsageOID.SERVER_AUTH,),
    )
    path = tmp_path / "ca" / "issued" / "service-extauthz.json"
    doc: dict[str, Any] = json.loads(path.read_text())
    doc["cert_pem"], doc["key_pem"] = old.cert_pem.decode(), old.key_pem.decode()
    path.write_text(json.dumps(doc))
    again = issuer(tmp_path, clock)
    again.update(mesh(), services=SERVICES)
    assert held(again)["extauthz"] not in (issued["extauthz"], old.serial)
    assert held(again)["ratelimit"] == issued["ratelimit"]
    cert = x509.load_pem_x509_certificate(again.service_certs["extauthz"].cert_pem)
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
    assert ExtendedKeyUsageOID.CLIENT_AUTH in usage.value
