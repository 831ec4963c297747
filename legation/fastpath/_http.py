"""The HTTP/1.1 connection: httptools parses, this class keeps order and limits.

One :class:`CalloutProtocol` per connection from Envoy. httptools (llhttp, strict) does all the
parsing and refuses what is malformed: a bad request line or header, a Content-Length given
twice, Content-Length with Transfer-Encoding, an invalid chunk. Any parse error, an oversized
head or body, or an upgrade is answered with a 4xx denial and the connection is closed: never an
allow. Pipelined requests are answered in order; a check that has to wait (a JWKS fetch, a
remote OPA) holds the answers behind it, and reading pauses when too many queue up.

Per request the work is: the parser's callbacks, one ``CheckRequest``, the servicer's
``decide`` stepped by hand (no task, no timer unless a check really waits), one ``write``.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import sys
import weakref
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import httptools

from legation import _unix
from legation.extauthz._stepping import resume
from legation.fastpath import answer
from legation.fastpath._tls import server_context
from legation.grpc_server import ServerTls, TlsSource

log = logging.getLogger("legation.fastpath")

_MAX_QUEUED = 32  # pipelined requests held behind a waiting check before reading pauses


@dataclass(frozen=True, slots=True)
class Call:
    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    keep_alive: bool


# The handler: a call -> the answer's bytes now, or a coroutine that will return them.
Handler = Callable[[Call], "bytes | Coroutine[Any, Any, bytes]"]


class _Reject(Exception):
    def __init__(self, status: int, code: str) -> None:
        self.status, self.code = status, code


@dataclass(frozen=True, kw_only=True)
class Limits:
    max_head_bytes: int = 64 * 1024  # request line + headers (Envoy's own default is 60 KiB)
    max_headers: int = 100
    max_body_bytes: int = 1024 * 1024


class CalloutProtocol(asyncio.Protocol):
    __slots__ = (
        "__weakref__",
        "_body",
        "_body_len",
        "_busy",
        "_head",
        "_headers",
        "_queue",
        "_target",
        "_task",
        "handler",
        "limits",
        "parser",
        "transport",
    )

    def __init__(self, handler: Handler, limits: Limits) -> None:
        self.handler = handler
        self.limits = limits
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self._queue: deque[Call] = deque()
        self._busy = False  # an answer is being computed by a task
        self._task: asyncio.Task[bytes] | None = None
        self._reset()

    def _reset(self) -> None:
        self._target = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._body: list[bytes] = []
        self._body_len = 0
        self._head = 0

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._queue.clear()
        if self._task is not None and getattr(self.handler, "cancel_when_closed", False):
            # the caller gave up (Envoy's timeout closes the connection): stop the work too
            self._task.cancel()

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(400, "upgrade_refused")
        except httptools.HttpParserCallbackError as e:
            reject = e.__context__ if isinstance(e.__context__, _Reject) else None
            if reject is None:
                log.exception("fast path: request handling failed")
                self._fail(500, "internal")
            else:
                self._fail(reject.status, reject.code)
        except httptools.HttpParserError:
            self._fail(400, "malformed_request")

    # -- httptools callbacks ---------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._reset()

    def on_url(self, url: bytes) -> None:
        self._target += url
        self._count(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + 4)
        self._headers.append((name, value))
        if len(self._headers) > self.limits.max_headers:
            raise _Reject(431, "too_many_headers")

    def on_headers_complete(self) -> None:
        if self.parser.should_upgrade():  # Upgrade or CONNECT: never a call Envoy makes
            raise _Reject(400, "upgrade_refused")

    def on_body(self, body: bytes) -> None:
        self._body.append(body)
        self._body_len += len(body)  # a running total: many tiny chunks cost linear time
        if self._body_len > self.limits.max_body_bytes:
            raise _Reject(413, "body_too_large")

    def on_message_complete(self) -> None:
        if self.transport is None:  # closed by an earlier answer in the same read
            return
        call = Call(
            self.parser.get_method(),
            self._target,
            self._headers,
            b"".join(self._body),
            self.parser.should_keep_alive(),
        )
        self._reset()
        if self._busy or self._queue:
            self._queue.append(call)
            if len(self._queue) >= _MAX_QUEUED and self.transport is not None:
                self.transport.pause_reading()
            return
        self._serve(call)

    def _count(self, n: int) -> None:
        self._head += n
        if self._head > self.limits.max_head_bytes:
            raise _Reject(431, "head_too_large")

    # -- answering -------------------------------------------------------------------------

    def _serve(self, call: Call) -> None:
        """Answer ``call`` now if its checks do not wait, else from a task (answers in order)."""
        out = self.handler(call)
        if isinstance(out, bytes):
            self._write(out, call.keep_alive)
            return
        try:
            waiting = out.send(None)
        except StopIteration as done:
            self._write(done.value, call.keep_alive)
            return
        except BaseException:
            out.close()
            log.exception("fast path: request handling failed")
            self._fail(500, "internal")
            return
        self._busy = True
        task = self._task = asyncio.get_running_loop().create_task(resume(out, waiting))
        task.add_done_callback(lambda t: self._finished(t, call.keep_alive))

    def _finished(self, task: asyncio.Task[bytes], keep_alive: bool) -> None:
        self._busy = False
        self._task = None
        if task.cancelled() or task.exception() is not None:
            if not task.cancelled():
                log.error("fast path: request handling failed", exc_info=task.exception())
            self._fail(500, "internal")
            return
        self._write(task.result(), keep_alive)
        while self._queue and not self._busy and self.transport is not None:
            self._serve(self._queue.popleft())
        if not self._queue and self.transport is not None:
            self.transport.resume_reading()

    def _write(self, data: bytes, keep_alive: bool) -> None:
        if self.transport is None:
            return
        self.transport.write(data)
        if not keep_alive:
            self._close()

    def _fail(self, status: int, code: str) -> None:
        """Deny with ``status`` and close: the stream cannot be trusted any further."""
        if self.transport is not None and not self.transport.is_closing():
            if not self._busy:  # with an answer pending, closing is the only clean reply
                self.transport.write(answer.error(status, code))
        self._close()

    def close(self) -> None:
        """Close the connection (the server is stopping): calls in flight are dropped."""
        self._close()

    def _close(self) -> None:
        self._queue.clear()
        if self.transport is not None:
            self.transport.close()
            self.transport = None


class Listening:
    """A bound server of :class:`CalloutProtocol` connections: ``port`` (0 on a Unix socket),
    ``path`` (the Unix socket's, or None), ``close()``."""

    def __init__(
        self,
        server: asyncio.Server,
        connections: weakref.WeakSet[CalloutProtocol],
        unix: _unix.Bound | None = None,
    ) -> None:
        self.server = server
        self.connections = connections
        self._unix = unix
        self.path = unix.path if unix is not None else None
        sock: socket.socket = server.sockets[0]
        self.port = 0 if unix is not None else int(sock.getsockname()[1])

    async def close(self) -> None:
        """Stop listening and close the open connections too (Envoy keeps them alive: a stopped
        service must stop answering, so Envoy's failure mode applies); a Unix socket's file is
        removed and its lock dropped."""
        self.server.close()
        if self._unix is not None:
            _unix.release(self._unix)
        for protocol in list(self.connections):
            protocol.close()
        await self.server.wait_closed()


async def listen(
    handler: Handler,
    *,
    host: str,
    port: int,
    limits: Limits,
    tls: ServerTls | TlsSource | None = None,
    reuse_port: bool = False,
    path: str | None = None,
) -> Listening:
    """Serve ``handler`` over HTTP/1.1 on ``host:port``, or with ``path`` on that Unix socket
    instead (:mod:`legation._unix`); mutual TLS with ``tls`` (:mod:`legation.fastpath._tls`).
    OSError when the address cannot be bound."""
    connections: weakref.WeakSet[CalloutProtocol] = weakref.WeakSet()

    def connection() -> CalloutProtocol:
        protocol = CalloutProtocol(handler, limits)
        connections.add(protocol)
        return protocol

    loop = asyncio.get_running_loop()
    context = server_context(tls) if tls is not None else None
    if path is None:
        server = await loop.create_server(
            connection, host, port, reuse_port=reuse_port or None, backlog=1024, ssl=context
        )
        return Listening(server, connections)
    bound = _unix.bind(path)
    # asyncio's own loop (3.13+) would unlink the file itself on close, following symlinks and
    # whatever is there by then: _unix.release does it (uvloop never does)
    keep: dict[str, Any] = (
        {"cleanup_socket": False} if _CLEANUP_SOCKET and _is_asyncio(loop) else {}
    )
    try:
        server = await loop.create_unix_server(connection, sock=bound.sock, ssl=context, **keep)
    except BaseException:
        bound.sock.close()
        _unix.release(bound)
        raise
    return Listening(server, connections, bound)


_CLEANUP_SOCKET = sys.version_info >= (3, 13)


def _is_asyncio(loop: asyncio.AbstractEventLoop) -> bool:
    return isinstance(loop, asyncio.BaseEventLoop)
