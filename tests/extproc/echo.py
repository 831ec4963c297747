"""A loopback upstream that understands chunked request bodies (DemoApp reads content-length only)
and echoes the request body and headers as JSON."""

from __future__ import annotations

import gzip
import json
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class _Echo(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _body(self) -> bytes:
        if "chunked" in self.headers.get("transfer-encoding", "").lower():
            data = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return data
                data += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("content-length", "0") or 0))

    def do_POST(self) -> None:
        body = self._body()
        out = json.dumps(
            {
                "service": "echo",
                "body": body.decode("utf-8", "replace"),
                "chunked": "chunked" in self.headers.get("transfer-encoding", ""),
                "headers": {
                    k.lower(): ",".join(self.headers.get_all(k) or ()) for k in self.headers
                },
            }
        ).encode()
        ctype = self.headers.get("x-echo-content-type", "application/json")
        if "/text" in self.path:
            out = b"plain text with authorization: keep-me"
            ctype = "text/plain"
        encoding = self.headers.get("x-echo-encoding", "")
        if encoding:  # the JSON compressed as asked (a response from a compressing upstream)
            out = _encode(out, encoding)
        self.send_response(200)
        self.send_header("content-type", ctype)
        if encoding:
            self.send_header("content-encoding", encoding.removesuffix("-bomb"))
        self.send_header("content-length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    do_GET = do_POST

    def log_message(self, *args: object) -> None:
        pass


def _encode(data: bytes, encoding: str) -> bytes:
    if encoding == "gzip":
        return gzip.compress(data)
    if encoding == "deflate":
        return zlib.compress(data)
    if encoding == "gzip-bomb":  # 16 MiB of JSON whitespace around the document, ~16 KB gzipped
        return gzip.compress(b" " * (16 << 20) + data, 9)
    return b"\x0b\x02\x80" + data + b"\x03"  # "br": not decodable here, whatever it holds


class EchoServer:
    def __init__(self) -> None:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def start(self) -> EchoServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
