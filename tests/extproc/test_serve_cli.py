"""``legation serve extproc --http-port``: the standalone service also answers Envoy's ext_proc
HTTP transport, worker i on ``--http-port + 100 i`` as on the gRPC port."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import free_port, worker_base_port

ROOT = Path(__file__).resolve().parents[2]
CHAINS = """\
chains:
  route:
    filters:
      - name: header_route
        options: {header: x-cohort, rules: [{header: x-beta, present: true, value: b}]}
"""


def serve(tmp: Path, *extra: str) -> subprocess.Popen[str]:
    (tmp / "chains.yaml").write_text(CHAINS)
    command = [sys.executable, "-m", "legation.cli", "serve", "extproc"]
    command += ["--config", str(tmp / "chains.yaml"), *extra]
    return subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
        start_new_session=True,  # its workers in its group: killed with it if a read hangs
    )


def lines_until(proc: subprocess.Popen[str], prefix: str, count: int) -> list[str]:
    assert proc.stdout is not None
    guard = threading.Timer(30, lambda: os.killpg(proc.pid, signal.SIGKILL))
    guard.start()
    found = []
    try:
        for line in proc.stdout:
            if line.startswith(prefix):
                found.append(line.strip())
            if len(found) == count:
                break
    finally:
        guard.cancel()
    return found


def cohort(port: int, headers: dict[str, str]) -> bytes:
    items = [
        {"key": k, "raw_value": base64.b64encode(v.encode()).decode()} for k, v in headers.items()
    ]
    body = json.dumps({"request_headers": {"headers": {"headers": items}}}).encode()
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/ext_proc/route",
        data=body,
        headers={"content-type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        answer = json.loads(resp.read())
    (mutation,) = answer["request_headers"]["response"]["header_mutation"]["set_headers"]
    return base64.b64decode(mutation["header"]["raw_value"])


@pytest.mark.integration
def test_two_workers_serve_the_http_transport_on_port_and_port_plus_100(tmp_path: Path) -> None:
    grpc_port, http_port = worker_base_port(2), worker_base_port(2)
    proc = serve(
        tmp_path,
        "--workers",
        "2",
        "--listen",
        f"127.0.0.1:{grpc_port}",
        "--http-port",
        str(http_port),
    )
    try:
        started = lines_until(proc, "extproc HTTP transport on ", 2)
        ports = sorted(int(line.rsplit(":", 1)[1]) for line in started)
        assert ports == [http_port, http_port + 100], started
        for port in ports:
            assert cohort(port, {"x-beta": "1"}) == b"b"
    finally:
        proc.terminate()
        code = proc.wait(15)
        if proc.stdout is not None:
            proc.stdout.close()
    assert code == 0


def test_a_taken_http_port_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = serve(tmp_path, "--listen", f"127.0.0.1:{free_port()}", "--http-port", str(port))
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 2
    assert f"extproc: cannot listen on 127.0.0.1:{port} (--http-port)" in out
