"""A workload certificate as issued: PEMs, SPIFFE id, serial, validity and when to renew it.

The private key is in ``key_pem`` only: it is left out of ``repr`` and of :meth:`summary` (what
logs and ``legation status`` show), and leaves the process only inside an SDS secret.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

#: Renew once this fraction of a certificate's lifetime has passed.
RENEW_AT = 2 / 3


@dataclass(frozen=True, slots=True)
class WorkloadCert:
    spiffe_id: str
    cert_pem: bytes = field(repr=False)
    key_pem: bytes = field(repr=False)
    serial: int
    issued_at: datetime
    not_before: datetime
    not_after: datetime

    @property
    def renew_at(self) -> datetime:
        return self.issued_at + (self.not_after - self.issued_at) * RENEW_AT

    def due(self, now: datetime) -> bool:
        return now >= self.renew_at

    @property
    def serial_hex(self) -> str:
        """The serial as Envoy's admin ``/certs`` prints it (lower-case hex)."""
        return format(self.serial, "x")

    def summary(self) -> dict[str, Any]:
        """What status pages show: identity and validity, never key material."""
        return {
            "spiffe_id": self.spiffe_id,
            "serial": self.serial_hex,
            "not_after": self.not_after.isoformat(),
            "renew_at": self.renew_at.isoformat(),
        }
