"""bench/extproc.py's Envoy side and load: the listeners of each setup, wrk, the open-loop
fixed-rate client and the routing check every setup passes before it is measured."""

from __future__ import annotations

import asyncio
import re
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from bench._extproc_services import CHAINS
from bench.floor import http_listener
from legation.extproc import envoy_filter
from legation.extproc.config import build_chains
from legation.fastpath import envoy_filter as fast_filter
from tests.extproc import harness

WRK_SCRIPT = """
local i = 0
request = function()
  i = i + 1
  if i % 2 == 0 then return wrk.format(nil, nil, {["x-beta"] = "1"}) end
  return wrk.format()
end
"""


def direct_listener(name: str, port: int) -> dict[str, Any]:
    answer = {"status": 200, "body": {"inline_string": name}}
    route = {"match": {"prefix": "/"}, "direct_response": answer}
    return http_listener(name, port, [route], [])


# the fused call-out as the translation builds it for a fused header_route: the header it reads
# sent to the server, the route named in the call, the answer's header applied, route re-picked
CALLOUT = fast_filter.Callout(
    cluster="legation-http", allowed_headers=("x-beta",), clear_route_cache=True
)


def fused_route(cluster: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
    return fast_filter.route_dict(
        harness.route("/", cluster, None, headers=headers), CALLOUT.name, route="route"
    )


EXTPROC_HTTP_FILTER = "legation.ext_proc.http.route"


def listener(
    name: str,
    port: int,
    routes: list[dict[str, Any]],
    ext_cluster: str | None,
) -> dict[str, Any]:
    filters = []
    if ext_cluster == "legation-http":
        filters.append(harness.to_dict(fast_filter.http_filter(CALLOUT)))
    elif ext_cluster == "legation-extproc-http":
        chain = build_chains(CHAINS).chains["route"]
        f = envoy_filter.http_transport_filter(EXTPROC_HTTP_FILTER, ext_cluster, chain)
        filters.append(harness.to_dict(f))
    elif ext_cluster:
        filters.append(harness.to_dict(envoy_filter.http_filter(ext_cluster)))
    return http_listener(name, port, routes, filters)


def wrk(port: int, seconds: float, script: Path) -> float:
    out = subprocess.run(
        ["wrk", "-t1", "-c16", f"-d{seconds:g}s", "-s", str(script), f"http://127.0.0.1:{port}/"],
        capture_output=True,
        text=True,
        timeout=seconds + 30,
    ).stdout
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if non2xx:
        print(f"    warning: {non2xx.group(1)} non-2xx answers")
    return float(m.group(1)) if m else 0.0


async def fixed_rate(port: int, rate: int, seconds: float, conns: int = 16) -> list[float]:
    """Open loop: request i is due at start + i/rate; latency counts from that due time."""
    total = int(rate * seconds)
    start = time.perf_counter() + 0.05
    latencies: list[float] = []
    next_i = 0

    async def worker() -> None:
        nonlocal next_i
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while next_i < total:
                i = next_i
                next_i += 1
                due = start + i / rate
                delay = due - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                extra = "x-beta: 1\r\n" if i % 2 else ""
                writer.write(f"GET / HTTP/1.1\r\nhost: b\r\n{extra}\r\n".encode())
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(re.search(rb"content-length: (\d+)", head, re.I).group(1))  # type: ignore[union-attr]
                await reader.readexactly(length)
                latencies.append(time.perf_counter() - due)
        finally:
            writer.close()

    await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(conns))), seconds * 3 + 10)
    return latencies


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(p / 100 * len(s)))] * 1000


def check(port: int, *, routes: bool) -> None:
    """The setup answers, and (when it routes) x-beta reaches the canary."""
    cases = [({}, b"stable"), ({"x-beta": "1"}, b"canary" if routes else b"stable")]
    for headers, want in cases:
        req = urllib.request.Request(f"http://127.0.0.1:{port}/", headers=headers)
        body = b""
        for _ in range(5):  # warm-up: a cold service may miss Envoy's 200 ms message_timeout
            try:
                with urllib.request.urlopen(req, timeout=5) as resp:
                    body = resp.read()
                break
            except urllib.error.HTTPError as err:
                body = f"HTTP {err.code}".encode()
                time.sleep(0.2)
        if body != want:
            raise RuntimeError(f"port {port}: expected {want!r}, got {body!r}")
