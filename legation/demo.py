"""Small loopback HTTP/1.1 demo apps for the quickstart and the integration tests.

Each app answers with JSON naming itself (service and version), echoes the request line and headers,
and can misbehave on purpose: ``fail_every=N`` answers 503 to every Nth request (a flaky service a
retry can hide), ``?delay_ms=`` or ``delay_ms`` makes it slow, ``/status/NNN`` answers NNN.
``GET /__demo/stats`` returns how many requests it has served (mirroring tests read it).

An app behind a sidecar knows its sidecar's outbound port (``outbound``) and can call other
services through it: ``?call=reviews`` (or ``?call=reviews,ratings``, at most
:data:`MAX_CALLS`) sends ``GET /`` with ``Host: reviews`` to the outbound listener, passing on the
trace context headers (:data:`PROPAGATED`) as an instrumented app does, so the calls join the
request's trace. Only names of the DNS-label kind are called, and only through the sidecar.
In a captured pod (``plain``: service name -> port) it calls ``http://<service>:<port>/`` instead,
as an app that does not know its sidecar; the pod's rules take the call to the sidecar.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import urllib.parse
from dataclasses import dataclass, field

MAX_CALLS = 4
#: the headers an app passes on so its outgoing calls join the incoming request's trace
PROPAGATED = ("traceparent", "tracestate", "x-request-id")
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


@dataclass
class DemoApp:
    name: str
    version: str = "v1"
    host: str = "127.0.0.1"
    port: int = 0
    fail_every: int = 0
    delay_ms: int = 0
    outbound: tuple[str, int] | None = None  # its sidecar's outbound listener (host, port)
    plain: dict[str, int] | None = None  # captured: service name -> port, called by name
    requests: int = 0
    paths: list[str] = field(default_factory=list)
    _server: asyncio.base_events.Server | None = None
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None
    _conns: set[asyncio.Task[None]] = field(default_factory=set)

    async def start(self) -> DemoApp:
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._conns):  # keep-alive connections outlive server.close()
                task.cancel()
            await asyncio.gather(*self._conns, return_exceptions=True)
            await self._server.wait_closed()

    def start_in_thread(self) -> DemoApp:
        """Run on a private event loop in a daemon thread; returns once the port is bound."""
        ready = threading.Event()

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            self._loop.run_until_complete(self.start())
            ready.set()
            self._loop.run_forever()
            self._loop.close()

        self._thread = threading.Thread(target=run, name=f"demo-{self.name}", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError(f"demo app {self.name} did not start")
        return self

    def stop_thread(self) -> None:
        if self._loop is None:
            return
        asyncio.run_coroutine_threadsafe(self.stop(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(5)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ", 2)
                headers: dict[str, str] = {}
                for line in lines[1:]:
                    if ":" in line:
                        k, v = line.split(":", 1)
                        headers[k.strip().lower()] = v.strip()
                length = int(headers.get("content-length", "0") or 0)
                body = await reader.readexactly(length) if length else b""
                status, payload = await self._handle(method, target, headers, body)
                data = json.dumps(payload).encode()
                close = headers.get("connection", "").lower() == "close"
                writer.write(
                    f"HTTP/1.1 {status} {'OK' if status < 400 else 'Error'}\r\n"
                    f"content-type: application/json\r\ncontent-length: {len(data)}\r\n"
                    f"x-demo-service: {self.name}\r\nx-demo-version: {self.version}\r\n"
                    f"{'connection: close' + chr(13) + chr(10) if close else ''}\r\n".encode()
                    + data
                )
                await writer.drain()
                if close:
                    break
        except (
            asyncio.IncompleteReadError,
            ConnectionError,
            ValueError,
            asyncio.LimitOverrunError,
            asyncio.CancelledError,
        ):
            pass
        finally:
            self._conns.discard(task)
            writer.close()

    async def _handle(
        self, method: str, target: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, dict[str, object]]:
        url = urllib.parse.urlsplit(target)
        if url.path == "/__demo/stats":
            return 200, {"service": self.name, "version": self.version, "requests": self.requests}
        self.requests += 1
        self.paths.append(url.path)
        query = urllib.parse.parse_qs(url.query)
        delay = int(query.get("delay_ms", [self.delay_ms])[0])
        if delay:
            await asyncio.sleep(delay / 1000)
        calls = await self._calls(query.get("call", []), headers)
        status = 200
        if url.path.startswith("/status/"):
            status = int(url.path.rsplit("/", 1)[1])
        elif self.fail_every and self.requests % self.fail_every == 1 % self.fail_every:
            status = 503
        return status, {
            "service": self.name,
            "version": self.version,
            "method": method,
            "path": url.path,
            "headers": headers,
            "body": body.decode("utf-8", "replace"),
            **({"calls": calls} if calls else {}),
        }

    async def _calls(self, wanted: list[str], headers: dict[str, str]) -> list[dict[str, object]]:
        names = [n for v in wanted for n in v.split(",") if _NAME.match(n)][:MAX_CALLS]
        if not names or (self.outbound is None and self.plain is None):
            return []
        passed = "".join(f"{h}: {headers[h]}\r\n" for h in PROPAGATED if h in headers)
        return [{"service": n, "status": await self._call(n, passed)} for n in names]

    async def _call(self, service: str, passed: str) -> int:
        """``GET /`` to ``service`` through the sidecar, or (captured) to
        ``http://<service>:<port>/``; its status (0: no answer)."""
        if self.plain is not None:
            if service not in self.plain:
                return 0
            where, host = (service, self.plain[service]), f"{service}:{self.plain[service]}"
        else:
            assert self.outbound is not None
            where, host = self.outbound, service
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(*where), 5)
        except (OSError, TimeoutError):
            return 0
        try:
            writer.write(
                f"GET / HTTP/1.1\r\nhost: {host}\r\n{passed}connection: close\r\n\r\n".encode()
            )
            await writer.drain()
            line = await asyncio.wait_for(reader.readline(), 10)
            parts = line.split(b" ", 2)
            return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
        except (OSError, TimeoutError):
            return 0
        finally:
            writer.close()
