"""The control plane on a private event loop in a background thread.

For synchronous callers (integration tests, scripts, a Python app embedding Legation): every method
is thread-safe and blocks until the loop has done the work.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from legation.xds.cache import NodeStatus, SnapshotCache
from legation.xds.server import XdsServer
from legation.xds.snapshot import Snapshot

T = TypeVar("T")


class BackgroundControlPlane:
    def __init__(
        self, *, host: str = "127.0.0.1", port: int = 0, debounce: float = 0.05
    ) -> None:
        self.host = host
        self.port = port
        self.debounce = debounce
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="legation-xds")
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
            self.server = await XdsServer(self.cache, host=self.host, port=self.port).start()
            self.port = self.server.port

        self._call(go)
        return self

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

    def pushes(self, short: str) -> float:
        assert self.cache is not None
        cache = self.cache
        return self._call(lambda: cache.metrics.pushes.labels(short)._value.get())  # type: ignore[no-any-return]
