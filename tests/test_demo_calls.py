"""The demo app's ``?call=``: calls go to its sidecar's outbound listener with the service as
Host, carrying the trace context headers (and no other header), and nothing but DNS-label names
is called."""

from __future__ import annotations

import json
import socket
import threading
import urllib.parse
import urllib.request

from legation.demo import MAX_CALLS, DemoApp


class FakeSidecar:
    """Stands in for the sidecar's outbound listener: records each request head, answers 200."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.heads: list[str] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                self.heads.append(data.decode("latin-1"))
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")


def test_calls_go_through_the_outbound_listener_with_the_trace_context() -> None:
    sidecar = FakeSidecar()
    app = DemoApp(name="frontend", outbound=("127.0.0.1", sidecar.port)).start_in_thread()
    try:
        traceparent = "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"
        names = ["reviews", "../etc", "Bad", "a b", "x" * 70, *[f"s{i}" for i in range(6)]]
        query = urllib.parse.urlencode({"call": ",".join(names)})
        req = urllib.request.Request(
            f"http://127.0.0.1:{app.port}/?{query}",
            headers={"traceparent": traceparent, "x-request-id": "rid", "cookie": "c=1"},
        )
        with urllib.request.urlopen(req, timeout=5) as resp:
            calls = json.loads(resp.read())["calls"]
        assert [c["service"] for c in calls] == ["reviews", "s0", "s1", "s2"][:MAX_CALLS]
        assert all(c["status"] == 200 for c in calls)
        assert len(sidecar.heads) == MAX_CALLS
        lines = sidecar.heads[0].split("\r\n")
        assert lines[0] == "GET / HTTP/1.1"
        assert "host: reviews" in lines
        assert f"traceparent: {traceparent}" in lines
        assert "x-request-id: rid" in lines
        assert not any(line.startswith("cookie") for line in lines)
    finally:
        app.stop_thread()
        sidecar.sock.close()


def test_without_a_sidecar_nothing_is_called() -> None:
    app = DemoApp(name="lonely").start_in_thread()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{app.port}/?call=reviews", timeout=5) as r:
            assert "calls" not in json.loads(r.read())
    finally:
        app.stop_thread()
