"""``legation up --ebpf``: the sockmap splice (:mod:`legation.capture.ebpf`) for one run.

The splice's cgroup is this run's own (named from its state directory and status port, so a
restart after a crash removes what the crashed run left). ``legation up`` joins it before it starts
any child: every child inherits it, and the sockets of the in-process demo apps are in it too. On
shutdown, after every child has stopped, the programs are detached, this process moves back to its
cgroup, and the cgroup and the pins are removed. With ``--capture`` too, the pods' apps' connections
to services are redirected at connect time (:mod:`legation.capture.ebpf.redirect`), followed on
reload.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import TYPE_CHECKING

from legation.capture.ebpf import Sockmap
from legation.capture.ebpf.redirect import for_mesh
from legation.capture.pods import Pods
from legation.config import Mesh
from legation.errors import LegationError


class StackSplice:
    if TYPE_CHECKING:
        ebpf: bool
        splice: Sockmap | None
        state_dir: Path
        status_port: int
        pods: Pods | None

        def say(self, line: str) -> None: ...

    async def _start_splice(self) -> bool:
        """Start the splice and join its cgroup; False (the reason said) when it cannot start."""
        splice = Sockmap.for_stack(self.state_dir, self.status_port)
        try:
            await asyncio.to_thread(splice.start)
        except LegationError as err:
            self.say(f"{err}\nnothing started (without --ebpf, legation up runs as usual)")
            return False
        self.splice = splice
        splice.join(os.getpid())
        self.say(f"--ebpf: sockops on cgroup {splice.cgroup}, sk_msg on {splice.pins}/maps")
        return True

    async def _redirect_pods(self, mesh: Mesh) -> None:
        """``--capture --ebpf``: connect-time redirection for the pods' apps (so their hop to the
        sidecar is spliced too; :mod:`legation.capture.ebpf.redirect`). If it cannot be set up,
        the pods' iptables rules capture as they do without ``--ebpf``."""
        if self.splice is None or self.pods is None or mesh.capture is None:
            return
        netns_of = {instance: pod.netns for instance, pod in self.pods.pods.items()}
        pods, services, inbound = for_mesh(mesh, netns_of)
        gid = mesh.capture.proxy_gid
        try:
            await asyncio.to_thread(self.splice.redirect, pods, gid, services, inbound)
        except LegationError as err:
            self.say(f"--ebpf: no connect-time redirection ({err}); iptables captures as usual")
            return
        self.say(
            f"--ebpf: connect-time redirection in {len(pods)} pods to {len(services)} services "
            f"and {len(inbound)} inbound ports"
        )

    async def _stop_splice(self) -> None:
        splice, self.splice = self.splice, None
        if splice is None:
            return
        counters = await asyncio.to_thread(splice.stats)
        await asyncio.to_thread(splice.stop)
        redirected = (
            f", {counters['redirected']} connections redirected at connect"
            if counters["redirected"]
            else ""
        )
        self.say(
            f"--ebpf: {counters['spliced']} messages spliced, {counters['passed']} sent the normal "
            f"way{redirected}; programs detached, cgroup {splice.cgroup} and pins removed"
        )
