"""What a request-path service does for one route (a :class:`Hop`), and the names its Envoy side
shares: one module both the per-kind sides and ``legation explain`` read."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from legation.services.kinds import ServiceKind

if TYPE_CHECKING:
    from legation.config.extensions import GrpcService

Protocol = Literal["grpc", "http"]


def cluster_name(kind: ServiceKind) -> str:
    """The static cluster Envoy calls the service on: ``legation|<kind>``."""
    return f"legation|{kind.name}"


def worker_endpoints(block: GrpcService, port: int) -> list[tuple[str, int]]:
    """One endpoint per worker of the service (worker i on ``port + 100 i``): Envoy's
    round robin over them spreads the calls, each endpoint its own HTTP/2 connection. Workers
    sharing one port (SO_REUSEPORT) would not: Envoy keeps one connection per worker thread,
    and the kernel hands each connection to one process (bench/workers.py measures both)."""
    return [(block.host, p) for p in block.worker_ports(port)]


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
