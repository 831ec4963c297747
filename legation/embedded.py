"""The xDS server of a control plane on a private event loop in a background thread.

For synchronous callers (integration tests, scripts, a Python app embedding Legation): every method
is thread-safe and blocks until the loop has done the work. It authenticates as the control plane
does: an xDS root kept in ``ca_dir/xds`` (generated there on first use; never a mesh root, see
:func:`legation.certs.enrol.xds_root`), and :meth:`enrol` writes a node's
credential files for the bootstrap of the proxy that will present them. It wires the protocol
(:mod:`legation.xds`) to the mesh CA (:mod:`legation.certs`), so it lives beside neither.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

from legation.certs.enrol import (
    BOOTSTRAP_TTL,
    Enrolments,
    NodeFiles,
    enrol,
    node_dir_name,
    xds_root,
)
from legation.certs.xds_auth import XdsAuth, serving_hosts
from legation.xds.cache import NodeStatus, SnapshotCache
from legation.xds.server import XdsServer
from legation.xds.snapshot import Snapshot

T = TypeVar("T")


class BackgroundControlPlane:
    def __init__(
        self,
        *,
        ca_dir: Path,
        host: str = "127.0.0.1",
        port: int = 0,
        debounce: float = 0.05,
    ) -> None:
        self.ca_dir = ca_dir
        self.ca = xds_root(ca_dir)
        self.enrolments = Enrolments.beside(ca_dir)
        self.host = host
        self.port = port
        self.debounce = debounce
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, daemon=True, name="legation-xds"
        )
        self._thread.start()
        self.cache: SnapshotCache | None = None
        self.server: XdsServer | None = None

    def _call(self, fn: Callable[[], Any]) -> Any:
        async def run() -> Any:
            result = fn()
            if asyncio.iscoroutine(result):
                result = await result
            return result

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(30)

    def start(self) -> BackgroundControlPlane:
        """(Re)start with a fresh cache, on the same port as before once one was bound."""

        async def go() -> None:
            self.cache = SnapshotCache(debounce=self.debounce)
            auth = XdsAuth.for_ca(self.ca, self.ca_dir, hosts=serving_hosts(self.host))
            self.server = await XdsServer(
                self.cache, host=self.host, port=self.port, auth=auth
            ).start()
            self.port = self.server.port

        self._call(go)
        return self

    def enrol(
        self, node_id: str, directory: Path | None = None, *, ttl: timedelta = BOOTSTRAP_TTL
    ) -> NodeFiles:
        """Issue ``node_id`` a credential (revoking its previous one) and write its files, by
        default into ``<ca_dir>/../nodes/<node>``; pass the directory to ``bootstrap``."""
        where = directory or self.ca_dir.parent / "nodes" / node_dir_name(node_id)
        return enrol(self.ca, self.enrolments, node_id, where, ttl=ttl)[1]

    def stop_server(self) -> None:
        if self.server is not None:
            server, self.server = self.server, None
            self._call(lambda: server.stop(0))

    def close(self) -> None:
        self.stop_server()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def set_snapshot(self, key: str, snapshot: Snapshot, *, flush: bool = True) -> None:
        def go() -> None:
            assert self.cache is not None
            self.cache.set_snapshot(key, snapshot)
            if flush:
                self.cache.flush()

        self._call(go)

    def status(self, node_id: str) -> dict[str, Any] | None:
        def go() -> dict[str, Any] | None:
            assert self.cache is not None
            st: NodeStatus | None = self.cache.status.get(node_id)
            return None if st is None else st.as_dict()

        return self._call(go)  # type: ignore[no-any-return]

    def refused(self, reason: str) -> float:
        """How many calls were refused for ``reason`` (see :data:`legation.xds.auth.REASONS`)."""
        assert self.cache is not None
        cache = self.cache
        return self._call(  # type: ignore[no-any-return]
            lambda: cache.metrics.auth_refused.labels(reason)._value.get()
        )

    def pushes(self, short: str) -> float:
        assert self.cache is not None
        cache = self.cache
        return self._call(lambda: cache.metrics.pushes.labels(short)._value.get())  # type: ignore[no-any-return]
