"""The real-Envoy half of ``bench/xds.py``: how long Envoy takes to apply a big ADS snapshot.

Two ways of timing it, both against the server process of ``_xds_server``:

* ``warm``: Envoy is started with nothing, connects, and waits (INITIALIZING); the snapshot is set
  while it is connected; apply time = from ``set_snapshot`` until Envoy is ready,
* ``cold``: the snapshot is set first, then Envoy starts; apply time = from starting the Envoy
  process until it is ready (includes Envoy's own start-up).

"Ready" is what Envoy's admin says: the ``server.state`` gauge is 0 (LIVE) and the
``cluster_manager.active_clusters`` gauge counts every cluster of the snapshot as warmed (plus the
static ``legation_xds`` cluster); confirmed afterwards by ``/server_info`` and ``/config_dump``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from bench._xds_server import ServerProcess
from legation.envoy_process import EnvoyProcess
from legation.translate.bootstrap import bootstrap
from tests.conftest import free_port

_READY = r"^(server\.state|cluster_manager\.active_clusters)$"
_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads, from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def wait_ready(proc: EnvoyProcess, clusters: int, timeout: float) -> float:
    """Poll the admin every 10 ms until LIVE with ``clusters`` active; the monotonic time then."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited:\n{proc.log_tail()}")
        try:
            stats = proc.stats(_READY)
        except OSError:  # admin not listening yet (cold start)
            stats = {}
        if (
            stats.get("server.state") == 0
            and stats.get("cluster_manager.active_clusters", 0) >= clusters + 1
        ):
            return time.monotonic()
        time.sleep(0.01)
    raise TimeoutError(
        f"{proc.name}: not LIVE with {clusters} clusters in {timeout:.0f} s:\n{proc.log_tail()}"
    )


def _wait_connected(server: ServerProcess, node: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while server.call("connected", nodes=[node])["connected"] < 1:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{node} did not open an ADS stream in {timeout:.0f} s")
        time.sleep(0.02)


def envoy_apply(
    server: ServerProcess,
    *,
    snapshot: str,
    services: int,
    delta: bool,
    cold: bool,
    node: str,
    workdir: Path,
    timeout: float = 60.0,
) -> dict[str, Any]:
    """Start one Envoy as ``node`` and time it applying ``snapshot`` (see the module doc)."""
    admin = free_port()
    proc = EnvoyProcess(
        bootstrap(
            node_id=node, xds_port=server.port, admin_port=admin, delta=delta, credentials_dir=None
        ),  # the bench server's plaintext test mode
        admin_port=admin,
        name=node,
        log_dir=workdir,
    )
    try:
        if cold:
            server.send("set", name=snapshot, key=node, nodes=[node], timeout=timeout)
            started = time.monotonic()
            proc.start()
            assert proc.proc is not None
            cpu0 = 0.0
        else:
            proc.start().wait_admin()
            assert proc.proc is not None
            _wait_connected(server, node, 20.0)
            cpu0 = cpu_seconds(proc.proc.pid)
            server.send("set", name=snapshot, key=node, nodes=[node], timeout=timeout)
            started = 0.0
        ready = wait_ready(proc, services, timeout)
        envoy_cpu = cpu_seconds(proc.proc.pid) - cpu0
        answer = server.reply(timeout)
        if not answer["ok"]:
            raise TimeoutError(f"{node} did not ACK every type: {answer['missing']}")
        state = json.loads(proc.admin_get("/server_info"))["state"]
        dumped = len(proc.config_dump("dynamic_active_clusters").get("configs", []))
    finally:
        proc.stop()
    t0 = started if cold else answer["t0"]
    return {
        "apply_s": ready - t0,
        "envoy_cpu_s": envoy_cpu,
        "server_acked_s": answer["acked_at"] - t0,
        "server_cpu_s": answer["cpu_s"],
        "type_acked_s": {t: at + answer["t0"] - t0 for t, at in answer["type_acked_s"].items()},
        "push_bytes": sum(answer["push_bytes"].values()),
        "server_info_state": state,
        "config_dump_clusters": dumped,
    }
