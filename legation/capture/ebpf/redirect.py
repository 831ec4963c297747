"""Connect-time redirection for ``--capture --ebpf`` (merbridge's outbound path).

With ``--capture`` alone, a pod's iptables rules REDIRECT the app's connection to a service's
virtual IP to its sidecar's outbound listener: NAT, so the app's and the sidecar's 4-tuples do not
mirror and the sockmap cannot splice that hop. With ``--ebpf`` too, ``legation_connect4``
(cgroup/connect4, on the run's own cgroup) rewrites such a ``connect()`` to
``127.0.0.1:<outbound port>`` before any packet exists, and ``legation_getsockopt``
(cgroup/getsockopt) gives the sidecar the original destination when it asks for
``SO_ORIGINAL_DST`` (conntrack has none: no NAT took place). The iptables rules stay as they are
and still catch anything the program leaves alone.

Which connections: only those of a process in the run's cgroup, in a pod listed in
``legation_pods`` (by network namespace cookie: the sidecar's outbound port and group id), not of
the sidecar's group, to a (virtual IP, port) listed in ``legation_services``. The list is what the
pods' rules would redirect (:func:`redirected`, the same include/exclude ports and CIDRs), so the
two paths agree.

Between pods: a sidecar's (or, outside the pods, the gateway's) connect to a pod's captured app
port goes to that pod's inbound port instead (``legation_inbound``), which the pod's rules would
have REDIRECTed it to: no NAT there either, so the two sidecars' sockets mirror and that hop is
spliced too (pod addresses are unique, so those pairs are keyed without the namespace). Only the
sidecars' group and processes outside the pods are sent there, never a pod's app.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from legation.capture.ebpf import _owned
from legation.capture.ebpf._kernel import bpftool
from legation.capture.errors import CaptureError

if TYPE_CHECKING:  # the model needs pydantic; this module is imported without it too
    from legation.config.capture import Capture
    from legation.config.model import Mesh

_SO_NETNS_COOKIE = 71  # Linux 5.14+
_COOKIE = (
    "import socket, sys\n"
    "with socket.socket() as s:\n"
    f"    raw = s.getsockopt(socket.SOL_SOCKET, {_SO_NETNS_COOKIE}, 8)\n"
    "print(int.from_bytes(raw, sys.byteorder))\n"
)


def netns_cookie(netns: str) -> int:
    """The cookie the kernel gives network namespace ``netns`` (what BPF programs see)."""
    command = ["ip", "netns", "exec", netns, sys.executable, "-c", _COOKIE]
    done = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
    if done.returncode != 0 or not done.stdout.strip().isdigit():
        raise CaptureError(f"--ebpf: {' '.join(command)} failed: {done.stderr.strip()}")
    return int(done.stdout)


def redirected(capture: Capture, vip: str, port: int) -> bool:
    """Whether a pod's rules send an app's TCP connection to ``vip:port`` to its sidecar."""
    out, ip = capture.outbound, ipaddress.IPv4Address(vip)
    if port in out.exclude_ports or any(ip in cidr for cidr in out.exclude_cidrs):
        return False
    if out.include_ports and port not in out.include_ports:
        return False
    return not out.include_cidrs or any(ip in cidr for cidr in out.include_cidrs)


def for_mesh(
    mesh: Mesh, netns_of: Mapping[str, str]
) -> tuple[dict[str, int], list[tuple[str, int]], list[tuple[str, int, int]]]:
    """What to redirect for ``mesh`` whose pods are ``netns_of`` (instance -> namespace): each
    pod's namespace -> its sidecar's outbound port; the services' (virtual IP, port) that the
    pods' rules capture; and each pod's (address, app port) that its rules capture inbound, with
    its sidecar's inbound port."""
    capture = mesh.capture
    assert capture is not None
    pods, inbound = {}, []
    for service in mesh.services:
        for index, endpoint in enumerate(service.endpoints):
            instance, sidecar = service.instance_name(index), endpoint.sidecar
            if sidecar is None or instance not in netns_of:
                continue
            pods[netns_of[instance]] = sidecar.outbound_port
            if endpoint.port in capture.inbound_ports(endpoint.port):
                inbound.append((capture.instance_ip(instance), endpoint.port, sidecar.inbound_port))
    vips = [(capture.service_ip(service.name), service.port) for service in mesh.services]
    return pods, [(vip, port) for vip, port in vips if redirected(capture, vip, port)], inbound


def _hex(data: bytes) -> list[str]:
    return [f"{byte:02x}" for byte in data]


class Redirection:
    """The pods, services and inbound ports of one splice's connect4 program, kept in its pinned
    maps."""

    def __init__(self, *, cgroup: Path, pins: Path) -> None:
        self.cgroup, self.pins = cgroup, pins
        self.pods: dict[int, bytes] = {}  # netns cookie -> its value in legation_pods
        self.services: set[tuple[str, int]] = set()
        self.inbound: dict[tuple[str, int], int] = {}  # (pod address, app port) -> inbound port
        self.attached = False

    def follow(
        self,
        pods: Mapping[str, int],
        proxy_gid: int,
        services: Iterable[tuple[str, int]],
        inbound: Iterable[tuple[str, int, int]] = (),
    ) -> None:
        """Redirect for ``pods`` (network namespace name -> sidecar outbound port), ``services``
        ((virtual IP, port)) and ``inbound`` ((pod address, app port, inbound port)); entries no
        longer wanted are removed. Attaches the programs the first time."""
        wanted_pods = {
            netns_cookie(netns): struct.pack("=II", port, proxy_gid) for netns, port in pods.items()
        }
        wanted = set(services)
        for cookie in set(self.pods) - set(wanted_pods):
            self._map("delete", _owned.PODS_MAP, struct.pack("=Q", cookie))
        for service in self.services - wanted:
            self._map("delete", _owned.SERVICES_MAP, _service_key(*service))
        for service in wanted - self.services:
            self._map("update", _owned.SERVICES_MAP, _service_key(*service), b"\x01")
        for cookie, value in wanted_pods.items():
            if self.pods.get(cookie) != value:
                self._map("update", _owned.PODS_MAP, struct.pack("=Q", cookie), value)
        to_inbound = {(ip, port): target for ip, port, target in inbound}
        for endpoint in set(self.inbound) - set(to_inbound):
            self._map("delete", _owned.INBOUND_MAP, _service_key(*endpoint))
        for endpoint, target in to_inbound.items():
            if self.inbound.get(endpoint) != target:
                key = _service_key(*endpoint)
                self._map("update", _owned.INBOUND_MAP, key, struct.pack("=I", target))
        self.pods, self.services, self.inbound = wanted_pods, wanted, to_inbound
        if not self.attached:
            for kind, prog in (
                ("connect4", _owned.CONNECT_PROG),
                ("getsockopt", _owned.GETSOCKOPT_PROG),
            ):
                bpftool("cgroup", "attach", str(self.cgroup), kind, "pinned", str(self.pins / prog))
            self.attached = True

    def _map(self, verb: str, path: str, key: bytes, value: bytes | None = None) -> None:
        args = ["map", verb, "pinned", str(self.pins / path), "key", "hex", *_hex(key)]
        bpftool(*args, *(["value", "hex", *_hex(value)] if value is not None else []))


def _service_key(vip: str, port: int) -> bytes:
    return socket.inet_aton(vip) + struct.pack("=I", port)
