"""The capture rules of one pod, as ``iptables-restore`` input, and its hosts file.

In the spirit of Istio's init container (``istio-iptables``), in the pod's own nat table:

* ``LEGATION_INBOUND`` (from PREROUTING): TCP arriving for a captured port (the app's, by
  default) goes to ``LEGATION_IN_REDIRECT``, a REDIRECT to the sidecar's inbound listener;
* ``LEGATION_OUTPUT`` (from OUTPUT): the app's outbound TCP goes to ``LEGATION_REDIRECT``, a
  REDIRECT to the sidecar's outbound listener, which reads the original destination
  (``SO_ORIGINAL_DST``); excluded: the sidecar's own traffic (its group id), 127.0.0.1, the
  excluded ports and CIDRs, and what the include lists leave out;
* loopback as Istio handles it: the sidecar connecting to its own instance's address (not
  127.0.0.1) on a captured port is inbound traffic (redirected to the inbound listener); the app
  talking to itself over loopback is left alone.

The filter table lets only the host (the bridge address) reach the sidecar's admin port, and only
the sidecar reach the host ports relayed into the pods (``host_ports``: the xDS server and the
request-path services): the app's connections there are neither captured nor let through.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from legation.config.capture import Capture


def pod_rules(
    capture: Capture,
    *,
    pod_ip: str,
    app_port: int,
    inbound_port: int,
    outbound_port: int,
    admin_port: int,
    host_ports: Sequence[int] = (),
) -> str:
    gid = str(capture.proxy_gid)
    out = capture.outbound
    nat = [
        "*nat",
        ":LEGATION_INBOUND - [0:0]",
        ":LEGATION_IN_REDIRECT - [0:0]",
        ":LEGATION_OUTPUT - [0:0]",
        ":LEGATION_REDIRECT - [0:0]",
        "-A PREROUTING -p tcp -j LEGATION_INBOUND",
        "-A OUTPUT -p tcp -j LEGATION_OUTPUT",
        f"-A LEGATION_IN_REDIRECT -p tcp -j REDIRECT --to-ports {inbound_port}",
        f"-A LEGATION_REDIRECT -p tcp -j REDIRECT --to-ports {outbound_port}",
    ]
    inbound = capture.inbound_ports(app_port)
    nat += [f"-A LEGATION_INBOUND -p tcp --dport {p} -j LEGATION_IN_REDIRECT" for p in inbound]
    nat += [
        f"-A LEGATION_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp --dport {p} "
        f"-m owner --gid-owner {gid} -j LEGATION_IN_REDIRECT"
        for p in inbound
    ]
    nat += [
        f"-A LEGATION_OUTPUT -o lo -m owner ! --gid-owner {gid} -j RETURN",
        f"-A LEGATION_OUTPUT -m owner --gid-owner {gid} -j RETURN",
        "-A LEGATION_OUTPUT -d 127.0.0.1/32 -j RETURN",
    ]
    bridge = f"-d {capture.bridge_ip}/32 -p tcp --dport"
    nat += [f"-A LEGATION_OUTPUT {bridge} {p} -j RETURN" for p in host_ports]
    nat += [f"-A LEGATION_OUTPUT -p tcp --dport {p} -j RETURN" for p in out.exclude_ports]
    nat += [f"-A LEGATION_OUTPUT -d {c} -j RETURN" for c in out.exclude_cidrs]
    nat += [f"-A LEGATION_OUTPUT {match}-j LEGATION_REDIRECT" for match in _includes(capture)]
    nat.append("COMMIT")
    admin = [
        "*filter",
        f"-A INPUT -p tcp -d {pod_ip}/32 --dport {admin_port} ! -s {capture.bridge_ip}/32 -j DROP",
        *(
            f"-A OUTPUT {bridge} {p} -m owner ! --gid-owner {gid} -j REJECT --reject-with tcp-reset"
            for p in host_ports
        ),
        "COMMIT",
    ]
    return "\n".join([*nat, *admin]) + "\n"


def _includes(capture: Capture) -> Iterable[str]:
    cidrs = [f"-d {c} " for c in capture.outbound.include_cidrs] or [""]
    ports = [f"-p tcp --dport {p} " for p in capture.outbound.include_ports] or ["-p tcp "]
    return [c + p for c in cidrs for p in ports]


def hosts_file(capture: Capture, services: Iterable[str]) -> str:
    """``/etc/hosts`` of the pods: localhost, and each service's name at its virtual IP."""
    lines = ["127.0.0.1 localhost", "::1 localhost ip6-localhost ip6-loopback"]
    lines += [f"{capture.service_ip(name)} {name}" for name in services]
    return "\n".join(lines) + "\n"
