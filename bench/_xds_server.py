"""The xDS server of ``bench/xds.py``, alone in a spawned process and driven over a pipe.

The server runs in its own process so that its CPU time and peak RSS are its own: the ADS clients
(or the real Envoy) that it serves live elsewhere. The bench process sends commands over a
``multiprocessing`` pipe; each is answered with one dict:

* ``build``: build a :class:`Snapshot` of N services here (the control plane's own encoding cost),
* ``clear``: drop the snapshot of a key, so that new clients connect to nothing,
* ``connected``: how many of the given nodes have an open ADS stream,
* ``set``: ``set_snapshot`` (debounce 0, so published at once) and wait until every given node has
  ACKed the snapshot's version of every type, as the cache records it (the server's view of
  "all ACKed"); answers with the times, the server's CPU time and the bytes it pushed meanwhile,
* ``stop``.

Times are ``time.monotonic()`` (CLOCK_MONOTONIC), comparable with the bench process's clock.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from collections import Counter
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from legation.xds.cache import SnapshotCache
from legation.xds.server import XdsServer
from legation.xds.snapshot import Snapshot
from legation.xds.types import ResourceType
from tests.xds.envoy_resources import services_snapshot

TYPES = (ResourceType.CLUSTER, ResourceType.ENDPOINT, ResourceType.LISTENER, ResourceType.ROUTE)
UPSTREAM_BASE = 20000  # endpoint ports: 127.0.0.1:20000+i; nothing ever connects to them


def build_snapshot(label: str, services: int, listen_port: int, bump: int | None) -> Snapshot:
    """``services`` services (a cluster, its endpoints, a route each) behind one listener.

    ``bump`` moves service number ``bump`` to another endpoint port: one EDS change.
    """
    ports = {f"svc-{i:04d}": UPSTREAM_BASE + i for i in range(services)}
    if bump is not None:
        ports[f"svc-{bump:04d}"] += 10000
    return services_snapshot(label, listen_port, ports)


def versions(snap: Snapshot) -> dict[str, str]:
    return {t.short: snap.version(t) for t in TYPES if snap.resources(t)}


class TimedCache(SnapshotCache):
    """A :class:`SnapshotCache` that notes the moment the last awaited ACK is recorded.

    It only observes: every protocol event is handed to the real cache unchanged.
    """

    def __init__(self) -> None:
        super().__init__(debounce=0.0)
        self.target: dict[str, str] = {}
        self.waiting: set[str] = set()
        self.done: asyncio.Event = asyncio.Event()
        self.done_at = 0.0
        self.type_acked_at: dict[str, float] = {}  # last awaited node's ACK of each type
        self.push_bytes: Counter[str] = Counter()
        self.pushes: Counter[str] = Counter()

    def expect(self, target: dict[str, str], nodes: list[str]) -> None:
        self.target = target
        self.waiting = set(nodes)
        self.type_acked_at = {}
        self.done.clear()
        for node in nodes:
            self._check(node)

    def _check(self, node: str) -> None:
        if node not in self.waiting:
            return
        st = self.status.get(node)
        if st is not None and all(st.acked.get(t) == v for t, v in self.target.items()):
            self.waiting.discard(node)
            if not self.waiting:
                self.done_at = time.monotonic()
                self.done.set()

    def record_ack(self, node_id: str, rtype: ResourceType, version: str) -> None:
        super().record_ack(node_id, rtype, version)
        if node_id in self.waiting and self.target.get(rtype.short) == version:
            self.type_acked_at[rtype.short] = time.monotonic()
        self._check(node_id)

    def record_push(self, node_id: str, rtype: ResourceType, nbytes: int) -> None:
        super().record_push(node_id, rtype, nbytes)
        self.push_bytes[rtype.short] += nbytes
        self.pushes[rtype.short] += 1


class Control:
    def __init__(self, cache: TimedCache) -> None:
        self.cache = cache
        self.snapshots: dict[str, Snapshot] = {}

    async def build(
        self, *, name: str, services: int, listen_port: int, bump: int | None = None
    ) -> dict[str, Any]:
        cpu0, t0 = time.process_time(), time.perf_counter()
        snap = build_snapshot(name, services, listen_port, bump)
        snap.check_consistent()
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        self.snapshots[name] = snap
        return {
            "build_s": elapsed,
            "build_cpu_s": cpu,
            "versions": versions(snap),
            "resources": len(snap),
            "encoded_bytes": {
                t.short: sum(len(r.data) for r in snap.resources(t).values()) for t in TYPES
            },
        }

    async def clear(self, *, key: str) -> dict[str, Any]:
        self.cache.clear_snapshot(key)
        return {}

    async def connected(self, *, nodes: list[str]) -> dict[str, Any]:
        return {
            "connected": sum(
                1 for n in nodes if (st := self.cache.status.get(n)) is not None and st.streams > 0
            )
        }

    async def set(self, *, name: str, key: str, nodes: list[str], timeout: float) -> dict[str, Any]:
        snap = self.snapshots[name]
        cache = self.cache
        cache.push_bytes.clear()
        cache.pushes.clear()
        cache.expect(versions(snap), [])  # nothing awaited while the snapshot is set
        cpu0, t0 = time.process_time(), time.monotonic()
        cache.set_snapshot(key, snap)
        cache.expect(versions(snap), nodes)
        try:
            await asyncio.wait_for(cache.done.wait(), timeout)
            ok = True
        except TimeoutError:
            ok = False
        return {
            "ok": ok,
            "missing": sorted(cache.waiting),
            "t0": t0,
            "acked_at": cache.done_at if ok else float("nan"),
            "cpu_s": time.process_time() - cpu0,
            "type_acked_s": {t: at - t0 for t, at in cache.type_acked_at.items()},
            "push_bytes": dict(cache.push_bytes),
            "pushes": dict(cache.pushes),
        }


async def _serve(conn: Connection) -> None:
    cache = TimedCache()
    # The protocol's cost is what is measured: the explicit loopback-only plaintext mode (the
    # control plane itself always serves TLS with client certificates).
    server = await XdsServer(cache, port=0, insecure_unauthenticated_loopback_only=True).start()
    control = Control(cache)
    conn.send({"port": server.port})
    loop = asyncio.get_running_loop()
    try:
        while True:
            cmd, kw = await loop.run_in_executor(None, conn.recv)
            if cmd == "stop":
                break
            try:
                reply = await getattr(control, cmd)(**kw)
            except Exception as err:  # reported to the bench process, which raises it
                reply = {"error": f"{type(err).__name__}: {err}"}
            conn.send(reply)
    finally:
        await server.stop(0)
        conn.send({"stopped": True})


def main(conn: Connection) -> None:
    """Entry point of the spawned server process."""
    asyncio.run(_serve(conn))


class ServerProcess:
    """The bench process's handle on the spawned server: commands, replies, its /proc entry."""

    def __init__(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=main, args=(child,), name="legation-xds-bench", daemon=True)
        self.port = 0

    def start(self, timeout: float = 60.0) -> ServerProcess:
        self.proc.start()
        self.port = self.reply(timeout)["port"]
        return self

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def send(self, cmd: str, **kw: Any) -> None:
        self._conn.send((cmd, kw))

    def reply(self, timeout: float = 120.0) -> dict[str, Any]:
        if not self._conn.poll(timeout):
            raise TimeoutError(f"xDS server process: no answer in {timeout:.0f} s")
        answer: dict[str, Any] = self._conn.recv()
        if "error" in answer:
            raise RuntimeError(f"xDS server process: {answer['error']}")
        return answer

    def call(self, cmd: str, **kw: Any) -> dict[str, Any]:
        self.send(cmd, **kw)
        return self.reply()

    async def acall(self, cmd: str, **kw: Any) -> dict[str, Any]:
        """``call`` without blocking the bench process's event loop (the clients keep running)."""
        self.send(cmd, **kw)
        return await asyncio.get_running_loop().run_in_executor(None, self.reply)

    def memory_mib(self) -> dict[str, float]:
        """VmRSS (now) and VmHWM (peak) of the server process, from /proc/<pid>/status."""
        out = {}
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) / 1024
        return out

    def stop(self) -> None:
        if self.proc.is_alive():
            try:
                self.send("stop")
                self.reply(10.0)
            except (OSError, EOFError, TimeoutError, RuntimeError):
                pass
            self.proc.join(5.0)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(5.0)
