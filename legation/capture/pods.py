"""``legation up --capture``'s network: the bridge, a pod per sidecar instance, the relay.

:class:`Pods` follows the mesh: a reload that adds a sidecar instance gets its pod, one that
removes an instance loses it, every pod's hosts file names every service, and a pod whose rules
would change (ports, include/exclude lists) gets them replaced whole (``iptables-restore``
flushes the tables it is given), and the relay follows the services' ports. The capture range
and the proxy group cannot change while running (the control plane rejects such a reload:
:func:`legation.config.capture.capture_change_problems`).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
from dataclasses import dataclass

from legation.capture import netns
from legation.capture.errors import CaptureError
from legation.capture.relay import Relay
from legation.capture.rules import hosts_file, pod_rules
from legation.config.capture import Capture
from legation.config.model import Endpoint, Mesh
from legation.envoy_process import setpriv_with_pdeathsig
from legation.translate import relay_targets


@dataclass(frozen=True, slots=True)
class _Wanted:
    service: str
    endpoint: Endpoint


class Pods:
    def __init__(self, capture: Capture) -> None:
        self.capture = capture
        self.network = netns.Network(capture)
        self.pods: dict[str, netns.Pod] = {}  # instance -> its pod
        self._rules: dict[str, str] = {}
        self.relay: Relay | None = None
        self.relayed: list[tuple[str, int]] = []  # host loopback (host, port) the pods reach
        self._lock: int | None = None  # the range's lock while this run holds it

    def start(self, mesh: Mesh) -> list[str]:
        """Check what capture needs, remove a crashed run's leftovers, make the bridge and the
        pods; what was left over (the names removed). Blocking: run it off the event loop."""
        netns.require()
        self.relayed = relay_targets(mesh)
        self._lock = self.network.lock()  # a live run's pods are never taken for leftovers
        removed = self.network.clean()
        self.network.check_range()
        self.network.create_bridge()
        self.follow(mesh)
        return removed

    async def start_relay(self) -> None:
        """Relay the bridge address to the host ports :meth:`start` found."""
        relay = Relay(self.capture.bridge_ip, self.relayed, device=self.network.bridge)
        self.relay = await relay.start()

    async def follow_relay(self) -> None:
        """Relay the host ports the last :meth:`follow` found (a reload may add a service)."""
        if self.relay is not None:
            await self.relay.follow(self.relayed)

    def follow(self, mesh: Mesh) -> tuple[list[str], list[str]]:
        """Pods for the sidecar instances of ``mesh``, none for others; (added, removed)."""
        self.relayed = relay_targets(mesh)
        wanted = {
            s.instance_name(i): _Wanted(s.name, e)
            for s in mesh.services
            for i, e in enumerate(s.endpoints)
            if e.sidecar is not None
        }
        hosts = hosts_file(self.capture, [s.name for s in mesh.services])
        removed = sorted(set(self.pods) - set(wanted))
        for instance in removed:
            self.network.remove_pod(self.pods.pop(instance))
            self._rules.pop(instance, None)
        added = []
        for instance, want in wanted.items():
            pod = self.pods.get(instance) or self.network.pod(instance)
            rules = self._rules_of(pod, want.endpoint)
            if instance not in self.pods:
                self.network.add_pod(pod, hosts=hosts, rules=rules)
                self.pods[instance] = pod
                added.append(instance)
            else:
                self.network.write_hosts(pod, hosts)
                if rules != self._rules[instance]:
                    netns.run(pod.exec_argv(["iptables-restore"]), stdin=rules)
            self._rules[instance] = rules
        return added, removed

    def _rules_of(self, pod: netns.Pod, endpoint: Endpoint) -> str:
        sidecar = endpoint.sidecar
        assert sidecar is not None
        return pod_rules(
            self.capture,
            pod_ip=pod.ip,
            app_port=endpoint.port,
            inbound_port=sidecar.inbound_port,
            outbound_port=sidecar.outbound_port,
            admin_port=sidecar.admin_port,
            host_ports=[port for _, port in self.relayed],
        )

    def app_command(self, instance: str, argv: list[str], *, services: dict[str, int]) -> list[str]:
        """A demo app's command line run in ``instance``'s pod, listening on every address of
        the pod and calling ``services`` (name -> port) by plain URL; in a PID namespace of its
        own (it sees no other process), as its own user (:func:`unprivileged`). Stopped by
        signalling its process group (:class:`legation.supervisor.Supervised`), tied to
        ``legation up`` with SIGKILL: ``unshare --fork`` ignores SIGTERM."""
        calls = [a for name, port in services.items() for a in ("--call-plain", f"{name}={port}")]
        return self.pods[instance].exec_argv(
            [
                *own_pid_namespace(),
                # KILL: as PID 1 of its namespace it would drop a TERM it has no handler for
                *unprivileged(self.capture.app_uid(instance), pdeathsig="KILL"),
                sys.executable,
                "-P",  # the working directory's modules are never imported
                "-m",
                "legation.cli",
                "demo",
                *argv,
                "--host",
                "0.0.0.0",
                *calls,
            ]
        )

    async def stop(self) -> list[str]:
        """Stop the relay and remove every pod, link and hosts file; what was removed."""
        if self.relay is not None:
            await self.relay.stop()
            self.relay = None
        self.pods.clear()
        if self._lock is None:
            return []  # never started: nothing of this run's to remove
        try:
            return await asyncio.to_thread(self.network.clean)
        finally:
            os.close(self._lock)
            self._lock = None


def own_pid_namespace() -> list[str]:
    """The prefix that runs a command as PID 1 of a new PID namespace with its own ``/proc``
    (``unshare``, util-linux): a pod's app sees only its own processes, not the other pods'
    apps, sidecars or Legation's. The command is killed when ``unshare`` dies."""
    unshare = shutil.which("unshare")
    if unshare is None:
        raise CaptureError(
            "--capture: unshare not found (Debian package util-linux); it gives each app its "
            "own PID namespace",
            code="capture_unavailable",
        )
    return [unshare, "--pid", "--fork", "--kill-child", "--mount-proc", "--"]


def unprivileged(uid: int, *, pdeathsig: str = "TERM") -> list[str]:
    """The prefix that runs a command as ``uid`` (user and group), with no supplementary groups,
    no capabilities (effective, inheritable or bounding) and no way to gain any (``setpriv``,
    util-linux): an app in a pod can neither take the proxy group nor rewrite its pod's rules.
    It also gets ``pdeathsig`` when ``legation up`` dies (the uid change clears the
    parent-death signal set before it, so this ``setpriv`` sets it again, where it can)."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        raise CaptureError(
            "--capture: setpriv not found (Debian package util-linux); it drops the apps' "
            "privileges",
            code="capture_unavailable",
        )
    return [
        setpriv,
        f"--reuid={uid}",
        f"--regid={uid}",
        "--clear-groups",
        "--inh-caps=-all",
        "--bounding-set=-all",
        "--no-new-privs",
        *((f"--pdeathsig={pdeathsig}",) if setpriv_with_pdeathsig() else ()),
        "--",
    ]
