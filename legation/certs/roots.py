"""Rotating a generated mesh root with an overlap: the files and the recorded phase.

``legation ca rotate-root`` (:func:`request_rotation`) generates the next root beside the
current one (``ca.next.crt`` 0644, ``ca.next.key`` 0600, written as ``ca.key`` is: never
replacing a file, under the CA lock) and records the rotation in ``rotation.json`` (0600, atomic
rename). The running control plane reads that file (:func:`open_roots`) and moves through the
phases, each published to every proxy over SDS before the next begins:

* :attr:`Phase.TRUST`: the trust bundle carries both roots; certificates still come from the old.
* :attr:`Phase.ISSUE`: once every proxy ACKed that bundle, every workload and service
  certificate is re-issued from the new root; the bundle still carries both.
* retirement: once every proxy ACKed those and the overlap passed, :func:`retire` archives the
  old root (``retired/ca-<fingerprint>.crt|key``, both 0600) and moves the new one into
  ``ca.crt``/``ca.key``; the bundle carries the new root only. The step is recorded first
  (:attr:`Phase.RETIRE`) and is idempotent, so a control plane stopped halfway finishes it on
  its next start.

No cross-signed certificate is made: a new-root certificate is presented only once every proxy
trusts the new root directly (the ACK gate), so no verifier ever needs a path from the old root
to it. The new root gets a subject of its own (a suffix), so chain building never has to tell
two roots of one name apart.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any

from cryptography import x509

from legation.certs._files import exclusive_lock, private_dir, write_new_private, write_private
from legation.certs.ca import CERT_FILE, KEY_FILE, LOCK_FILE, CertificateAuthority
from legation.certs.errors import CertError

NEXT_CERT = "ca.next.crt"
NEXT_KEY = "ca.next.key"
STATE_FILE = "rotation.json"
RETIRED_DIR = "retired"
DEFAULT_OVERLAP = timedelta(seconds=60)

__all__ = [
    "DEFAULT_OVERLAP",
    "Phase",
    "Roots",
    "RotationState",
    "advance",
    "open_roots",
    "read_state",
    "request_rotation",
    "retire",
    "rotation_requested",
]


class Phase(StrEnum):
    TRUST = "trust"  # bundle: old + new; certificates from the old root
    ISSUE = "issue"  # bundle: old + new; certificates from the new root
    RETIRE = "retire"  # the old root being archived and the new one moved into place


@dataclass(frozen=True, slots=True)
class RotationState:
    """What ``rotation.json`` records: fingerprints only, never key material."""

    phase: Phase
    old: str
    new: str
    overlap: timedelta
    requested_at: datetime
    phase_since: datetime

    def to_json(self) -> dict[str, Any]:
        return {
            "phase": str(self.phase),
            "old_fingerprint": self.old,
            "new_fingerprint": self.new,
            "overlap_s": self.overlap.total_seconds(),
            "requested_at": self.requested_at.isoformat(),
            "phase_since": self.phase_since.isoformat(),
        }

    @classmethod
    def from_json(cls, raw: Any, path: Path) -> RotationState:
        try:
            return cls(
                phase=Phase(raw["phase"]),
                old=str(raw["old_fingerprint"]),
                new=str(raw["new_fingerprint"]),
                overlap=timedelta(seconds=float(raw["overlap_s"])),
                requested_at=datetime.fromisoformat(raw["requested_at"]),
                phase_since=datetime.fromisoformat(raw["phase_since"]),
            )
        except (KeyError, TypeError, ValueError):
            raise CertError(
                f"{path}: not a root rotation record (fix or remove it)", code="rotation_invalid"
            ) from None


@dataclass(frozen=True, slots=True)
class Roots:
    """The roots a mesh uses now: ``signer`` issues certificates, ``trusted`` is the bundle."""

    signer: CertificateAuthority
    trusted: tuple[CertificateAuthority, ...]
    state: RotationState | None

    @property
    def bundle_pem(self) -> bytes:
        return b"".join(ca.root_pem for ca in self.trusted)

    def same_as(self, other: Roots | None) -> bool:
        return (
            other is not None
            and self.signer.fingerprint == other.signer.fingerprint
            and [c.fingerprint for c in self.trusted] == [c.fingerprint for c in other.trusted]
        )


def read_state(directory: Path) -> RotationState | None:
    path = directory / STATE_FILE
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise CertError(
            f"{path}: cannot read the root rotation record: {err}", code="rotation_invalid"
        ) from None
    return RotationState.from_json(raw, path)


def _write_state(directory: Path, state: RotationState) -> None:
    write_private(directory / STATE_FILE, json.dumps(state.to_json(), indent=1).encode())


def request_rotation(
    directory: Path, *, overlap: timedelta = DEFAULT_OVERLAP, now: datetime | None = None
) -> RotationState:
    """Generate the next root beside the current one (for the same trust domain) and record
    phase ``trust``; ``overlap``: how long both roots stay trusted once every certificate comes
    from the new one. Refused (``rotation_in_progress``) while a rotation is under way; the
    current root must load (the same ownership and permission checks as every use)."""
    now = now or datetime.now(UTC)
    try:
        private_dir(directory)
        with exclusive_lock(directory / LOCK_FILE):
            held = read_state(directory)
            if (
                held is not None
                or (directory / NEXT_CERT).exists()
                or (directory / NEXT_KEY).exists()
            ):
                if held is None:
                    raise CertError(
                        f"{directory}: {NEXT_CERT} or {NEXT_KEY} is there without "
                        f"{STATE_FILE}: a rotation request that did not finish; remove them to "
                        f"request again",
                        code="rotation_in_progress",
                    )
                raise CertError(
                    f"{directory}: a root rotation is already in progress (phase {held.phase}, "
                    f"new root {held.new}); wait for it to finish (`legation status` shows the "
                    f"phase) before requesting another",
                    code="rotation_in_progress",
                )
            if not (directory / CERT_FILE).exists():
                raise CertError(
                    f"{directory}: no mesh root to rotate ({CERT_FILE} is missing)",
                    code="ca_unreadable",
                )
            current = CertificateAuthority.load(directory / CERT_FILE, directory / KEY_FILE)
            label = f"{now:%Y%m%d%H%M%S}-{secrets.token_hex(2)}"
            nxt = CertificateAuthority.generate(
                trust_domain=_trust_domain(current), now=now, label=label
            )
            nxt._store(directory, cert_name=NEXT_CERT, key_name=NEXT_KEY)
            state = RotationState(
                phase=Phase.TRUST,
                old=current.fingerprint,
                new=nxt.fingerprint,
                overlap=overlap,
                requested_at=now,
                phase_since=now,
            )
            _write_state(directory, state)
            return state
    except OSError as err:
        raise CertError(
            f"{directory}: cannot store the new root: {err.strerror or err}", code="ca_write_failed"
        ) from None


def _trust_domain(ca: CertificateAuthority) -> str:
    """The trust domain a root names (its ``spiffe://<td>`` SAN; a brought root may have none)."""
    try:
        sans = ca.cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return "cluster.local"
    for uri in sans.get_values_for_type(x509.UniformResourceIdentifier):
        if uri.startswith("spiffe://"):
            return uri.removeprefix("spiffe://").split("/", 1)[0]
    return "cluster.local"


def rotation_requested(directory: Path) -> bool:
    """Whether a rotation is recorded (or its record is being written) in ``directory``."""
    return (directory / STATE_FILE).exists() or (directory / NEXT_CERT).exists()


def open_roots(directory: Path, *, trust_domain: str) -> Roots:
    """The roots of the generated CA in ``directory`` as the recorded phase says (no rotation:
    the one root). A retirement left halfway is finished first."""
    state = read_state(directory)
    if state is not None and state.phase is Phase.RETIRE:
        retire(directory, state)
        state = None
    current = CertificateAuthority.in_directory(directory, trust_domain=trust_domain)
    if state is None:
        return Roots(current, (current,), None)
    nxt = CertificateAuthority.load(directory / NEXT_CERT, directory / NEXT_KEY)
    if (current.fingerprint, nxt.fingerprint) != (state.old, state.new):
        raise CertError(
            f"{directory / STATE_FILE}: records roots {state.old} -> {state.new}, "
            f"but {CERT_FILE} is {current.fingerprint} and {NEXT_CERT} is "
            f"{nxt.fingerprint}",
            code="rotation_invalid",
        )
    return Roots(current if state.phase is Phase.TRUST else nxt, (current, nxt), state)


def advance(directory: Path, state: RotationState, phase: Phase, *, now: datetime) -> RotationState:
    """Record ``phase`` (under the CA lock); with :attr:`Phase.RETIRE`, also carry it out."""
    moved = replace(state, phase=phase, phase_since=now)
    with exclusive_lock(directory / LOCK_FILE):
        _write_state(directory, moved)
    if phase is Phase.RETIRE:
        retire(directory, moved)
    return moved


def retire(directory: Path, state: RotationState) -> None:
    """Archive the old root (0600 copies under ``retired/``), move the new root into
    ``ca.crt``/``ca.key``, drop the record. Each step is skipped if already done."""
    archive = directory / RETIRED_DIR
    stem = "ca-" + state.old.replace(":", "")[:16].lower()
    with exclusive_lock(directory / LOCK_FILE):
        private_dir(archive)
        current = (
            CertificateAuthority.load(directory / CERT_FILE, directory / KEY_FILE)
            if (directory / NEXT_KEY).exists()
            else None
        )
        if current is not None and current.fingerprint == state.old:
            for name, suffix in ((KEY_FILE, ".key"), (CERT_FILE, ".crt")):
                target = archive / (stem + suffix)
                if not target.exists():
                    write_new_private(target, (directory / name).read_bytes(), 0o600)
        # the key first: a reader that finds a certificate and key that do not match refuses
        # them, and the control plane is the one reader that holds the lock meanwhile
        for src, dst in ((NEXT_KEY, KEY_FILE), (NEXT_CERT, CERT_FILE)):
            if (directory / src).exists():
                os.replace(directory / src, directory / dst)
        (directory / STATE_FILE).unlink(missing_ok=True)
