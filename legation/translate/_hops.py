"""What a request-path service does for one route (a :class:`Hop`), and the names its Envoy side
shares: one module both the per-kind sides and ``legation explain`` read."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from legation.services.kinds import ServiceKind

Protocol = Literal["grpc", "http"]


def cluster_name(kind: ServiceKind) -> str:
    """The static cluster Envoy calls the service on: ``legation|<kind>``."""
    return f"legation|{kind.name}"


@dataclass(frozen=True, kw_only=True)
class Hop:
    """What one service does for one route, and why: ``calls`` (a call-out per request),
    over ``protocol`` through ``filter`` to ``cluster`` (all None when it makes no call)."""

    kind: str
    calls: bool
    reason: str
    protocol: Protocol | None = None
    filter: str | None = None
    cluster: str | None = None


def _no_call(kind: str, reason: str) -> Hop:
    return Hop(kind=kind, calls=False, reason=reason)


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))
