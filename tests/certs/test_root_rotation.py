"""Root rotation with overlap: ``legation ca rotate-root`` records it, the control plane walks the
phases (both roots trusted -> certificates from the new root -> old root retired), each gated on
every proxy having ACKed the last, and resumes after a restart. No Envoy here: the gate is a
switch and the rotation steps are called directly (the timer is stopped); the trust bundles are
read from the published snapshots. Through a real Envoy: ``test_root_rotation_envoy.py``."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from legation.certs import TRUST_BUNDLE, WORKLOAD_CERT, CertError, CertificateAuthority
from legation.certs.roots import (
    NEXT_CERT,
    NEXT_KEY,
    STATE_FILE,
    Phase,
    open_roots,
    read_state,
    request_rotation,
)
from legation.cli import main as cli
from legation.controlplane import ControlPlane
from legation.xds.types import ResourceType
from tests.certs.test_controlplane_certs import Clock, write

TD = "cluster.local"


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def new_ca(tmp_path: Path) -> tuple[Path, CertificateAuthority]:
    ca_dir = tmp_path / "ca"
    return ca_dir, CertificateAuthority.in_directory(ca_dir, trust_domain=TD)


def bundle_roots(cp: ControlPlane, node: str) -> list[x509.Certificate]:
    """The roots in ``node``'s published trust bundle."""
    message: Any = cp.snapshots[node].resources(ResourceType.SECRET)[TRUST_BUNDLE].message
    pem = message.validation_context.trusted_ca.inline_bytes
    return x509.load_pem_x509_certificates(pem)


def workload(cp: ControlPlane, node: str) -> x509.Certificate:
    message: Any = cp.snapshots[node].resources(ResourceType.SECRET)[WORKLOAD_CERT].message
    chain = message.tls_certificate.certificate_chain.inline_bytes
    return x509.load_pem_x509_certificate(chain)


def fingerprints(certs: list[x509.Certificate]) -> list[str]:
    from cryptography.hazmat.primitives import hashes

    return [c.fingerprint(hashes.SHA256()).hex(":").upper() for c in certs]


def signed_by(cert: x509.Certificate, ca: CertificateAuthority) -> bool:
    try:
        cert.verify_directly_issued_by(ca.cert)
        return True
    except Exception:
        return False


# -- the request ---------------------------------------------------------------------------


def test_request_writes_the_next_root_beside_the_ca_privately(tmp_path: Path) -> None:
    ca_dir, old = new_ca(tmp_path)
    state = request_rotation(ca_dir, overlap=timedelta(minutes=5))
    assert state.phase is Phase.TRUST and state.old == old.fingerprint
    assert mode(ca_dir / NEXT_KEY) == 0o600 and mode(ca_dir / STATE_FILE) == 0o600
    nxt = CertificateAuthority.load(ca_dir / NEXT_CERT, ca_dir / NEXT_KEY)
    assert nxt.fingerprint == state.new != old.fingerprint
    assert nxt.cert.subject != old.cert.subject  # never two roots of one name
    sans = nxt.cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.UniformResourceIdentifier) == [f"spiffe://{TD}"]
    assert read_state(ca_dir) == state
    record = (ca_dir / STATE_FILE).read_text()
    assert "PRIVATE" not in record and state.new in record  # fingerprints, never keys


def test_a_second_request_while_one_is_in_progress_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ca_dir, _ = new_ca(tmp_path)
    state = request_rotation(ca_dir)
    before = {p.name: p.read_bytes() for p in ca_dir.iterdir() if p.is_file()}
    with pytest.raises(CertError) as err:
        request_rotation(ca_dir)
    assert err.value.code == "rotation_in_progress"
    assert str(err.value) == (
        f"{ca_dir}: a root rotation is already in progress (phase trust, new root "
        f"{state.new}); wait for it to finish (`legation status` shows the phase) before "
        f"requesting another"
    )
    assert cli(["ca", "rotate-root", "--ca-dir", str(ca_dir)]) == 1
    assert "already in progress" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in ca_dir.iterdir() if p.is_file()} == before


def test_the_cli_refuses_a_ca_directory_others_can_write(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ca_dir, _ = new_ca(tmp_path)
    ca_dir.chmod(0o777)
    assert cli(["ca", "rotate-root", "--ca-dir", str(ca_dir)]) == 1
    assert "chmod 700" in capsys.readouterr().err
    assert not (ca_dir / NEXT_KEY).exists()


def test_a_retirement_stopped_halfway_is_finished_on_the_next_open(tmp_path: Path) -> None:
    ca_dir, old = new_ca(tmp_path)
    state = request_rotation(ca_dir)
    # as if the control plane died after recording "retire" and moving only the key
    record = json.loads((ca_dir / STATE_FILE).read_text())
    (ca_dir / STATE_FILE).write_text(json.dumps({**record, "phase": "retire"}))
    archive = ca_dir / "retired"
    archive.mkdir(mode=0o700)
    stem = "ca-" + state.old.replace(":", "")[:16].lower()
    for name, suffix in (("ca.key", ".key"), ("ca.crt", ".crt")):
        (archive / (stem + suffix)).write_bytes((ca_dir / name).read_bytes())
        (archive / (stem + suffix)).chmod(0o600)
    os.replace(ca_dir / NEXT_KEY, ca_dir / "ca.key")
    roots = open_roots(ca_dir, trust_domain=TD)
    assert roots.state is None and fingerprints([c.cert for c in roots.trusted]) == [state.new]
    assert roots.signer.fingerprint == state.new
    assert not (ca_dir / STATE_FILE).exists() and not (ca_dir / NEXT_CERT).exists()
    kept = CertificateAuthority.load(archive / (stem + ".crt"), archive / (stem + ".key"))
    assert kept.fingerprint == old.fingerprint


# -- the phases, in a control plane ----------------------------------------------------------


class Gate:
    """Whether every proxy ACKed what was published (the control plane's in-sync check)."""

    def __init__(self) -> None:
        self.open = False

    def __call__(self) -> bool:
        return self.open


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def mesh(tmp_path: Path) -> Path:
    path = tmp_path / "mesh.yaml"
    write(path, mode="strict", cert_ttl="1h", ca_dir="ca")
    return path


async def started(mesh: Path, clock: Clock, gate: Gate) -> ControlPlane:
    cp = ControlPlane(
        mesh,
        status_port=0,
        poll_interval=3600,
        on_event=lambda line: None,
        clock=clock,
        rotation_check=3600,
    )
    await cp.start()
    cp.rotation.stop()  # the test steps the rotation itself
    cp.rotation.in_sync = gate
    return cp


@pytest.fixture
async def planes() -> AsyncIterator[list[ControlPlane]]:
    held: list[ControlPlane] = []
    yield held
    for cp in held:
        await cp.stop()


async def test_the_phases_each_published_and_gated(
    mesh: Path, clock: Clock, planes: list[ControlPlane]
) -> None:
    gate = Gate()
    cp = await started(mesh, clock, gate)
    planes.append(cp)
    ca_dir = mesh.parent / "ca"
    old = CertificateAuthority.load(ca_dir / "ca.crt", ca_dir / "ca.key")
    nodes = sorted(cp.snapshots)
    assert cp.rotation.step_root() is None  # nothing requested: nothing happens
    state = request_rotation(ca_dir, overlap=timedelta(minutes=10), now=clock.now)
    new = CertificateAuthority.load(ca_dir / NEXT_CERT, ca_dir / NEXT_KEY)
    serials = {n: c.serial for n, c in cp.issuer.certs.items()}

    # (a) picked up at once, although no proxy has ACKed anything: both roots trusted
    assert cp.rotation.step_root() is Phase.TRUST
    for node in nodes:
        assert fingerprints(bundle_roots(cp, node)) == [old.fingerprint, new.fingerprint]
        assert signed_by(workload(cp, node), old)
    assert {n: c.serial for n, c in cp.issuer.certs.items()} == serials
    ca_status = cp.status()["mtls"]["ca"]
    assert ca_status["rotation"]["phase"] == "trust"
    assert ca_status["rotation"]["old_fingerprint"] == old.fingerprint
    assert ca_status["rotation"]["new_fingerprint"] == new.fingerprint
    assert ca_status["trusted"] == [old.fingerprint, new.fingerprint]
    assert "PRIVATE" not in json.dumps(cp.status())
    assert cp.rotation.step_root() is Phase.TRUST  # not every proxy has the bundle yet

    # (b) once every proxy ACKed it and the phase settled: certificates from the new root,
    # both still trusted
    gate.open = True
    assert cp.rotation.step_root() is Phase.TRUST  # not settled: service processes follow
    clock.now += cp.rotation.settle
    assert cp.rotation.step_root() is Phase.ISSUE
    for node in nodes:
        assert signed_by(workload(cp, node), new)
        assert fingerprints(bundle_roots(cp, node)) == [old.fingerprint, new.fingerprint]
    assert cp.status()["mtls"]["ca"]["fingerprint_sha256"] == new.fingerprint
    assert read_state(ca_dir).phase is Phase.ISSUE  # type: ignore[union-attr]
    gate.open = False
    clock.now += timedelta(hours=1)
    assert cp.rotation.step_root() is Phase.ISSUE  # the overlap passed, the ACKs not in
    gate.open = True
    clock.now -= timedelta(minutes=55)
    assert cp.rotation.step_root() is Phase.ISSUE  # ACKed, the overlap not passed

    # (c) both: the old root retired, archived privately, the new one only trusted
    clock.now += timedelta(minutes=10)
    assert cp.rotation.step_root() is None
    for node in nodes:
        assert fingerprints(bundle_roots(cp, node)) == [new.fingerprint]
        assert signed_by(workload(cp, node), new)
    assert (
        CertificateAuthority.load(ca_dir / "ca.crt", ca_dir / "ca.key").fingerprint
        == new.fingerprint
    )
    assert not (ca_dir / NEXT_KEY).exists() and not (ca_dir / STATE_FILE).exists()
    archived = sorted((ca_dir / "retired").iterdir())
    assert [mode(p) for p in archived] == [0o600, 0o600] and mode(ca_dir / "retired") == 0o700
    stem = "ca-" + state.old.replace(":", "")[:16].lower()
    assert [p.name for p in archived] == [stem + ".crt", stem + ".key"]
    ca_status = cp.status()["mtls"]["ca"]
    assert ca_status["rotation"] is None and ca_status["trusted"] == [new.fingerprint]
    # and a new rotation may be requested again
    assert request_rotation(ca_dir).old == new.fingerprint


@pytest.mark.parametrize("phase", [Phase.TRUST, Phase.ISSUE])
async def test_a_restart_mid_phase_resumes_it(
    mesh: Path, clock: Clock, phase: Phase, planes: list[ControlPlane]
) -> None:
    gate = Gate()
    cp = await started(mesh, clock, gate)
    ca_dir = mesh.parent / "ca"
    old = CertificateAuthority.load(ca_dir / "ca.crt", ca_dir / "ca.key")
    request_rotation(ca_dir, overlap=timedelta(0), now=clock.now)
    new = CertificateAuthority.load(ca_dir / NEXT_CERT, ca_dir / NEXT_KEY)
    cp.rotation.step_root()
    if phase is Phase.ISSUE:
        gate.open = True
        clock.now += cp.rotation.settle
        cp.rotation.step_root()
        gate.open = False
    assert cp.issuer.root_phase is phase
    serials = {n: c.serial for n, c in cp.issuer.certs.items()}
    await cp.stop()

    again = await started(mesh, clock, gate)  # the phase, served from the first publish on
    planes.append(again)
    assert again.issuer.root_phase is phase
    signer = old if phase is Phase.TRUST else new
    for node in sorted(again.snapshots):
        assert fingerprints(bundle_roots(again, node)) == [old.fingerprint, new.fingerprint]
        assert signed_by(workload(again, node), signer)
    # the certificates of that phase are kept, not issued again
    assert {n: c.serial for n, c in again.issuer.certs.items()} == serials
    assert again.rotation.step_root() is phase  # the gate is still closed
    gate.open = True
    for _ in range(3):
        clock.now += again.rotation.settle
        again.rotation.step_root()
    assert again.issuer.root_phase is None
    assert fingerprints(bundle_roots(again, sorted(again.snapshots)[0])) == [new.fingerprint]


async def test_a_bad_record_keeps_the_roots_served_and_says_why(
    mesh: Path, clock: Clock, planes: list[ControlPlane]
) -> None:
    cp = await started(mesh, clock, Gate())
    planes.append(cp)
    ca_dir = mesh.parent / "ca"
    before = {n: s.version(ResourceType.SECRET) for n, s in cp.snapshots.items()}
    (ca_dir / STATE_FILE).write_text('{"phase": "trust"}')
    with pytest.raises(CertError) as err:
        cp.rotation.step_root()
    assert err.value.code == "rotation_invalid"
    assert str(err.value) == f"{ca_dir / STATE_FILE}: not a root rotation record (fix or remove it)"
    assert {n: s.version(ResourceType.SECRET) for n, s in cp.snapshots.items()} == before
    assert cp.issuer.root_phase is None


def test_a_request_that_did_not_finish_is_named(tmp_path: Path) -> None:
    ca_dir, _ = new_ca(tmp_path)
    request_rotation(ca_dir)
    (ca_dir / STATE_FILE).unlink()  # as if the request died before recording it
    with pytest.raises(CertError) as err:
        request_rotation(ca_dir)
    assert str(err.value) == (
        f"{ca_dir}: ca.next.crt or ca.next.key is there without rotation.json: a rotation "
        f"request that did not finish; remove them to request again"
    )
    assert open_roots(ca_dir, trust_domain=TD).state is None  # the current root still served
