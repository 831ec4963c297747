"""Transparent capture (``legation up --capture``, or a ``capture:`` block): the model, its checks,
and the addresses it gives instances and services.

::

    capture:
      cidr: 10.213.0.0/16      # Legation's private range: the bridge, the namespaces, service VIPs
      proxy_gid: 1337          # the sidecars run with this group id; their traffic is not captured
      app_uid_base: 200000     # each pod's app runs as its own user and group (base + its address
                               # in the range), with no capabilities: apps cannot touch each other
      inbound:
        include_ports: []      # default: the instance's app port
        exclude_ports: []      # e.g. the app port itself: plaintext straight to the app
      outbound:
        include_ports: []      # default: every port
        exclude_ports: []
        include_cidrs: []      # default: every destination
        exclude_cidrs: []
        policy: allow_any      # unknown destinations pass through (registry_only: refused)

Addresses are derived, not allocated: each sidecar instance's namespace and each service's virtual
IP is a hash of its name into ``cidr`` (the first address after the network is the bridge's), so
the control plane and ``legation up`` agree without sharing state, and reloads keep addresses.
Two names hashing to one address is a mesh problem (rename one, or widen ``cidr``).
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Iterator
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, Field

from legation.config._types import STRICT, Port
from legation.config.errors import MeshConfigError, Problem

if TYPE_CHECKING:
    from legation.config.model import Mesh

_LOOPBACK = ipaddress.IPv4Network("127.0.0.0/8")


def _cidr(value: Any) -> Any:
    if isinstance(value, ipaddress.IPv4Network):
        return value
    if not isinstance(value, str):
        raise ValueError(f"expected an IPv4 CIDR such as 10.0.0.0/8, got {value!r}")
    try:
        return ipaddress.IPv4Network(value.strip(), strict=True)
    except ValueError as err:
        raise ValueError(
            f"expected an IPv4 CIDR such as 10.0.0.0/8, got {value!r}: {err}"
        ) from None


Cidr = Annotated[ipaddress.IPv4Network, BeforeValidator(_cidr)]


class CaptureInbound(BaseModel):
    model_config = STRICT
    include_ports: list[Port] = Field(default_factory=list, description="default: the app port")
    exclude_ports: list[Port] = Field(default_factory=list)


class CaptureOutbound(BaseModel):
    model_config = STRICT
    include_ports: list[Port] = Field(default_factory=list, description="default: every port")
    exclude_ports: list[Port] = Field(default_factory=list)
    include_cidrs: list[Cidr] = Field(default_factory=list, description="default: everywhere")
    exclude_cidrs: list[Cidr] = Field(default_factory=list)
    policy: Literal["allow_any", "registry_only"] = "allow_any"


class Capture(BaseModel):
    model_config = STRICT
    cidr: Cidr = ipaddress.IPv4Network("10.213.0.0/16")
    proxy_gid: int = Field(default=1337, ge=1, le=65534)
    app_uid_base: int = Field(default=200_000, ge=65_536, le=2**31 - 2**24 - 2)
    inbound: CaptureInbound = Field(default_factory=CaptureInbound)
    outbound: CaptureOutbound = Field(default_factory=CaptureOutbound)

    @property
    def bridge_ip(self) -> str:
        """The host's address on Legation's bridge: the namespaces' default gateway."""
        return str(self.cidr.network_address + 1)

    def instance_ip(self, instance: str) -> str:
        """The address of the namespace of ``instance`` (a sidecar instance's name)."""
        return self._hashed(f"instance/{instance}")

    def service_ip(self, service: str) -> str:
        """The virtual IP ``service`` resolves to in the namespaces (no interface has it)."""
        return self._hashed(f"service/{service}")

    def _hashed(self, key: str) -> str:
        # the network address, the bridge's and the broadcast address are never handed out
        usable = self.cidr.num_addresses - 3
        digest = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")
        return str(self.cidr.network_address + 2 + digest % usable)

    def app_uid(self, instance: str) -> int:
        """The user and group id of the app in ``instance``'s pod: the base plus the pod's offset
        in the range, so every pod's app has its own (pod addresses never collide), above every
        system and proxy id, and the same after a reload."""
        offset = int(ipaddress.IPv4Address(self.instance_ip(instance))) - int(
            self.cidr.network_address
        )
        return self.app_uid_base + offset

    def inbound_ports(self, app_port: int) -> list[int]:
        """The ports whose inbound TCP is captured for an instance whose app listens on
        ``app_port``."""
        wanted = self.inbound.include_ports or [app_port]
        return [p for p in dict.fromkeys(wanted) if p not in self.inbound.exclude_ports]


def with_capture(mesh: Mesh, *, source: str) -> Mesh:
    """``mesh`` with capture on (``--capture``): its own ``capture:`` block, or the defaults,
    checked as the block would be (:class:`MeshConfigError` naming ``source``)."""
    if mesh.capture is not None:
        return mesh
    captured = mesh.model_copy(update={"capture": Capture()})
    problems = list(capture_problems(captured))
    if problems:
        raise MeshConfigError(source, problems)
    return captured


def capture_change_problems(before: Mesh, after: Mesh) -> list[Problem]:
    """What a running mesh may not change about capture: the pods exist, with their addresses
    and their sidecars' group (``legation up`` needs a restart for that)."""
    was, now = before.capture, after.capture
    if (was is None) != (now is None):
        verb = "turned on" if was is None else "turned off"
        return [Problem("capture", f"cannot be {verb} while running: restart legation up")]
    if was is None or now is None:
        return []
    return [
        Problem(f"capture.{field}", "cannot change while running: restart legation up")
        for field in ("cidr", "proxy_gid")
        if getattr(was, field) != getattr(now, field)
    ]


def capture_problems(mesh: Mesh) -> Iterator[Problem]:
    c = mesh.capture
    if c is None:
        return
    if not 8 <= c.cidr.prefixlen <= 24:
        yield Problem("capture.cidr", f"needs a prefix between /8 and /24, got /{c.cidr.prefixlen}")
        return
    if c.cidr.overlaps(_LOOPBACK) or c.cidr.is_multicast or c.cidr.is_reserved:
        yield Problem("capture.cidr", f"{c.cidr} is not a usable private range")
        return
    # the bridge's address puts a route to this range in the host's table: a public range or
    # link-local (cloud metadata at 169.254.169.254) would send the host's own traffic to pods
    if not c.cidr.is_private or c.cidr.is_link_local:
        yield Problem(
            "capture.cidr",
            f"{c.cidr} is not a private range (such as 10/8, 172.16/12 or 192.168/16; "
            "never public or link-local addresses)",
        )
        return
    for block in ("inbound", "outbound"):
        ports = getattr(c, block)
        both = sorted(set(ports.include_ports) & set(ports.exclude_ports))
        if both:
            yield Problem(
                f"capture.{block}.exclude_ports",
                f"port {both[0]} is also in capture.{block}.include_ports",
            )
    both_cidrs = sorted(set(c.outbound.include_cidrs) & set(c.outbound.exclude_cidrs))
    if both_cidrs:
        yield Problem(
            "capture.outbound.exclude_cidrs",
            f"{both_cidrs[0]} is also in capture.outbound.include_cidrs",
        )
    yield from _collisions(mesh, c)


def _collisions(mesh: Mesh, c: Capture) -> Iterator[Problem]:
    taken: dict[str, str] = {}
    wanted = [(f"service {s.name!r}", c.service_ip(s.name)) for s in mesh.services]
    wanted += [
        (f"instance {s.instance_name(i)!r}", c.instance_ip(s.instance_name(i)))
        for s in mesh.services
        for i, e in enumerate(s.endpoints)
        if e.sidecar is not None
    ]
    for what, ip in wanted:
        if ip in taken:
            yield Problem(
                "capture.cidr",
                f"{what} and {taken[ip]} both hash to {ip}: rename one or widen the range",
            )
        else:
            taken[ip] = what
