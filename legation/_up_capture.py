"""``legation up --capture`` (or a mesh with a ``capture:`` block): pods for one run.

Before any child starts, :class:`legation.capture.pods.Pods` removes what a crashed run left
(named from the capture range), makes the bridge and a pod per sidecar instance, and relays the
bridge address to the host's loopback for the control plane and the request-path services. Each
sidecar's Envoy then runs in its pod under the proxy group (its admin on the pod's address, xDS
through the relay) and each of their demo apps in the same pod, calling services by plain URL. On
shutdown, after every child has stopped, the relay stops and every pod, link and hosts file goes.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from legation.capture.pods import Pods
from legation.config import DemoSpec, Mesh
from legation.config.proxies import SIDECAR_PREFIX
from legation.errors import LegationError
from legation.supervisor import Supervised

_APP_READY = 10.0  # seconds a pod's demo app has to bind its port


class StackCapture:
    if TYPE_CHECKING:
        pods: Pods | None
        log_dir: Path

        def say(self, line: str) -> None: ...

        def _child(
            self,
            role: str,
            command: list[str],
            ready_line: str | None = None,
            worker: int | None = None,
            parent_death: str = "TERM",
        ) -> Supervised: ...

    async def _start_capture(self, mesh: Mesh) -> bool:
        """The pods and the relay; False (the reason said, nothing left behind) when capture
        cannot start."""
        assert mesh.capture is not None
        pods = Pods(mesh.capture)
        try:
            removed = await asyncio.to_thread(pods.start, mesh)
            await pods.start_relay()
        except (LegationError, OSError) as err:
            said = str(err)
            self.say(said if "nothing started" in said else f"{said}\nnothing started")
            await pods.stop()  # removes what it made, if it took the range
            return False
        self.pods = pods
        if removed:
            self.say(f"--capture: removed what an earlier run left: {', '.join(removed)}")
        net = pods.network
        self.say(
            f"--capture: {len(pods.pods)} pods on bridge {net.bridge} ({mesh.capture.cidr}); "
            f"`ip netns exec {net.prefix}<instance> curl http://<service>:<port>/` runs as an app"
        )
        return True

    async def _stop_capture(self) -> None:
        pods, self.pods = self.pods, None
        if pods is not None:
            removed = await pods.stop()
            self.say(f"--capture: removed {len(removed)} namespaces, links and hosts files")

    def _pod_envoy(self, node: str) -> dict[str, Any]:
        """How the Envoy of ``node`` runs: in its pod (bootstrap and process options), or as
        usual (empty)."""
        if self.pods is None or not node.startswith(SIDECAR_PREFIX):
            return {}
        pod = self.pods.pods.get(node[len(SIDECAR_PREFIX) :])
        if pod is None:
            return {}
        return {
            "xds_host": self.pods.capture.bridge_ip,
            "admin_host": pod.ip,
            "netns": pod.netns,
            "gid": self.pods.capture.proxy_gid,
        }

    async def _pod_app(self, spec: DemoSpec, mesh: Mesh) -> Supervised | None:
        """``spec``'s demo app started in its instance's pod; None if it has no pod."""
        if self.pods is None or spec.instance not in self.pods.pods:
            return None
        argv = ["--name", spec.service, "--version", spec.version, "--port", str(spec.port)]
        argv += ["--fail-every", str(spec.fail_every), "--delay-ms", str(spec.delay_ms)]
        command = self.pods.app_command(
            spec.instance, argv, services={s.name: s.port for s in mesh.services}
        )
        # KILL: the pod's unshare --fork ignores SIGTERM (app_command)
        app = self._child(
            f"app-{spec.instance}", command, ready_line="demo app ", parent_death="KILL"
        )
        await app.start()
        deadline = time.monotonic() + _APP_READY
        while not app.ready and app.alive() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if not app.ready:
            await app.stop()
            raise OSError(f"demo app {spec.instance} did not start in its pod: {app.tail[-3:]}")
        return app
