"""A TCP relay from the bridge address to the host's loopback.

The control plane and the request-path services listen on the host's loopback, which the pods do
not share. Rather than open them to every interface, ``legation up`` listens on the bridge address
at the same ports and copies bytes both ways. Its sockets are bound to the bridge device
(``SO_BINDTODEVICE``), so connections arriving over the host's other networks are refused: they
could otherwise route to the bridge address (the host does not forward for them, but the address
is its own). The host's own processes can connect, as they can to the loopback behind.
What crosses it is what would have crossed loopback: mTLS to the xDS server and, with ``tls:
mesh``, to the services; the relay sees only ciphertext then.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable, Coroutine
from typing import Any

log = logging.getLogger("legation.capture.relay")
_CHUNK = 64 * 1024


class Relay:
    """Listens on ``bind``:port for each (host, port) target, forwarding to it; with ``device``,
    only for connections arriving over that network device."""

    def __init__(self, bind: str, targets: list[tuple[str, int]], *, device: str = "") -> None:
        self.bind = bind
        self.targets = targets
        self.device = device
        self._servers: dict[tuple[str, int], asyncio.Server] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> Relay:
        try:
            await self.follow(self.targets)
        except OSError:
            await self.stop()
            raise
        return self

    async def follow(self, targets: list[tuple[str, int]]) -> None:
        """Listen for the ``targets`` given now (after a reload): new ones start, gone ones stop
        accepting (their open connections run on)."""
        for gone in [t for t in self._servers if t not in targets]:
            server = self._servers.pop(gone)
            server.close()
            await server.wait_closed()
        for host, port in targets:
            if (host, port) not in self._servers:
                self._servers[host, port] = await self._listen(host, port)
        self.targets = list(targets)

    async def _listen(self, host: str, port: int) -> asyncio.Server:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if self.device:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, self.device.encode())
            sock.bind((self.bind, port))
            sock.listen(128)
            sock.setblocking(False)
            return await asyncio.start_server(self._handler(host, port), sock=sock)
        except OSError:
            sock.close()
            raise

    async def stop(self) -> None:
        servers = list(self._servers.values())
        self._servers = {}
        for server in servers:
            server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for server in servers:
            await server.wait_closed()

    def _handler(
        self, host: str, port: int
    ) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], None]:
        def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self._track(self._pipe(reader, writer, host, port))

        return accepted

    def _track(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str, port: int
    ) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(host, port)
        except OSError as err:
            log.warning("relay to %s:%d: %s", host, port, err)
            writer.close()
            return
        try:
            await asyncio.gather(_copy(reader, up_writer), _copy(up_reader, writer))
        finally:
            for w in (writer, up_writer):
                w.close()


async def _copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError, OSError):
        while data := await reader.read(_CHUNK):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
