"""An asyncio event loop in a daemon thread, for tests that block while async code runs."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from legation import _loop

T = TypeVar("T")


class LoopThread:
    """An event loop in a daemon thread (a control plane and its services run on it): the
    kind ``legation serve`` runs them on (uvloop; ``LEGATION_EVENT_LOOP=asyncio`` for
    asyncio's own, :mod:`legation._loop`)."""

    def __init__(self) -> None:
        self.loop = _loop.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


class ServiceThread(LoopThread):
    """A gRPC service started by ``start()`` (a coroutine giving ``(server, port)``) on its own
    loop thread, so sync tests can drive Envoy against it; ``stop`` ends it (default: the
    server with no grace)."""

    def __init__(
        self,
        start: Callable[[], Awaitable[tuple[Any, int]]],
        *,
        stop: Callable[[Any], Awaitable[Any]] | None = None,
    ) -> None:
        super().__init__()
        self._start, self._stop = start, stop
        self.server: Any = None
        self.port = 0

    def start(self) -> ServiceThread:
        async def started() -> tuple[Any, int]:
            return await self._start()

        try:
            self.server, self.port = self.run(started(), timeout=20)
        except BaseException:
            self.close()
            raise
        return self

    def call(self, what: Any, timeout: float = 20) -> Any:
        """Run a coroutine, or a plain function, on the service's loop (to read its state
        safely) and return its result."""
        if not asyncio.iscoroutine(what):
            fn = what

            async def run() -> Any:
                return fn()

            what = run()
        return self.run(what, timeout)

    def stop(self) -> None:
        if self.server is not None:
            server, self.server = self.server, None
            self.run(self._stop(server) if self._stop else server.stop(0), timeout=20)
        self.close()
