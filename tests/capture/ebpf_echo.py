"""Two ends of a TCP conversation, run as separate processes by test_ebpf.py and bench/ebpf.py.

``serve``: listen on 127.0.0.1 (port 0), print the port, accept one connection, send a greeting of
GREETING bytes, then echo everything back until the peer closes. ``talk PORT COUNT``: connect, read
the greeting, send COUNT messages of varying size (1 B to 64 KiB) and check each echo byte for
byte; print the bytes echoed. ``sink CONNECTIONS`` / ``burst PORT CONNECTIONS COUNT``: per
connection, the client sends COUNT numbered messages the moment it is connected and closes; the
server waits a little before reading, then checks every byte arrived in order; it prints the
connections checked. ``sidecar PORT CONNECTIONS [HOST]``: on 127.0.0.1:PORT (or HOST:PORT), per
connection, answer
the original destination (``SO_ORIGINAL_DST``, or ``none``) as a line, then echo. ``dial IP PORT``:
connect, print that line, check 20 echoes; print ``unreachable`` if the connect fails.
Bounded: a 20 s socket timeout everywhere.
"""

from __future__ import annotations

import socket
import sys
import time

GREETING = 256 * 1024
TIMEOUT = 20.0


def _read_exactly(conn: socket.socket, size: int) -> bytes:
    chunks, got = [], 0
    while got < size:
        chunk = conn.recv(min(size - got, 1 << 20))
        if not chunk:
            raise SystemExit(f"peer closed after {got} of {size} bytes")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def serve() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(TIMEOUT)
        print(listener.getsockname()[1], flush=True)
        conn, _ = listener.accept()
    with conn:
        conn.settimeout(TIMEOUT)
        conn.sendall(bytes(range(256)) * (GREETING // 256))
        while data := conn.recv(1 << 20):
            conn.sendall(data)


def _numbered(index: int) -> bytes:
    return f"{index:08d}".encode() * 16


def sink(connections: int) -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(TIMEOUT)
        print(listener.getsockname()[1], flush=True)
        for _ in range(connections):
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(TIMEOUT)
                time.sleep(0.02)  # let the sender run ahead: early and late bytes both queued
                data = b"".join(iter(lambda c=conn: c.recv(1 << 20), b""))  # type: ignore[misc]
            size = len(_numbered(0))
            if data != b"".join(_numbered(i) for i in range(len(data) // size)) or len(data) % size:
                raise SystemExit("bytes out of order or torn")
    print(connections, flush=True)


def burst(port: int, connections: int, count: int) -> None:
    for _ in range(connections):
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as conn:
            for index in range(count):
                conn.sendall(_numbered(index))


def sidecar(port: int, connections: int, host: str = "127.0.0.1") -> None:
    with socket.create_server((host, port)) as listener:
        listener.settimeout(TIMEOUT)
        print(port, flush=True)
        for _ in range(connections):
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(TIMEOUT)
                try:
                    raw = conn.getsockopt(socket.SOL_IP, 80, 16)  # SO_ORIGINAL_DST
                    origin = f"{socket.inet_ntoa(raw[4:8])}:{int.from_bytes(raw[2:4], 'big')}"
                except OSError:
                    origin = "none"
                conn.sendall(origin.encode() + b"\n")
                while data := conn.recv(1 << 20):
                    conn.sendall(data)


def dial(ip: str, port: int) -> None:
    try:
        conn = socket.create_connection((ip, port), timeout=5)
    except OSError:
        print("unreachable", flush=True)
        return
    with conn:
        line = b""
        while not line.endswith(b"\n"):
            line += conn.recv(1)
        for index in range(20):
            message = bytes([index]) * (1024 * (1 + index % 4))
            conn.sendall(message)
            if _read_exactly(conn, len(message)) != message:
                raise SystemExit(f"echo {index} corrupted")
    print(line.decode().strip(), flush=True)


def talk(port: int, count: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as conn:
        if _read_exactly(conn, GREETING) != bytes(range(256)) * (GREETING // 256):
            raise SystemExit("greeting corrupted")
        echoed = 0
        for index in range(count):
            size = 1 + (index * 7919) % (64 * 1024)
            message = bytes([index % 251]) * size
            conn.sendall(message)
            if _read_exactly(conn, size) != message:
                raise SystemExit(f"message {index} corrupted")
            echoed += size
    print(echoed, flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve()
    elif sys.argv[1] == "sink":
        sink(int(sys.argv[2]))
    elif sys.argv[1] == "sidecar":
        sidecar(int(sys.argv[2]), int(sys.argv[3]), *sys.argv[4:5])
    elif sys.argv[1] == "dial":
        dial(sys.argv[2], int(sys.argv[3]))
    elif sys.argv[1] == "burst":
        burst(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
    else:
        talk(int(sys.argv[2]), int(sys.argv[3]))
