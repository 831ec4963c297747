"""ext_authz in HTTP mode vs gRPC: which HTTP server answers Envoy's call-out cheapest, one run.

    .venv/bin/python -m bench.http_callout [--seconds 4] [--rounds 2] [--connections 16]

Set up as :mod:`bench.floor` (whose helpers it imports): one front Envoy (``--concurrency 1``)
in front of a second Envoy answering ``direct_response``; one listener per row, measured one
after the other with ``wrk``, rounds interleaved. Every service always allows:

  plain         proxying only (the limit)
  grpc-min      ext_authz gRPC -> minimal grpc.aio servicer (bench/floor.py's authz-min)
  h-asyncio     ext_authz HTTP -> asyncio Protocol + httptools, default event loop
  h-uvloop      ext_authz HTTP -> the same Protocol on uvloop
  uvicorn       ext_authz HTTP -> uvicorn (httptools, uvloop), a raw ASGI app
  granian       ext_authz HTTP -> granian, an RSGI app (1 worker, 1 runtime thread)
  leg-grpc      ext_authz gRPC -> Legation's extauthz service, one check that allows
  leg-http      ext_authz HTTP -> Legation's fast path (legation.fastpath), the same check

Legation's two rows run on the loop ``legation serve`` runs them on (:mod:`legation._loop`:
uvloop; ``LEGATION_EVENT_LOOP=asyncio`` for asyncio's own).

The HTTP rows use :mod:`legation.fastpath.envoy_filter` (the config Legation ships: per-route
``http_service`` override with the policy headers). Per row: rps, ratio to plain, service CPU
per check (whole process tree, from /proc) and the front Envoy's. Any non-2xx is an error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bench import floor
from tests.conftest import free_port

ROWS = ("plain", "grpc-min", "h-asyncio", "h-uvloop", "uvicorn", "granian", "leg-grpc", "leg-http")
HTTP_ROWS = ("h-asyncio", "h-uvloop", "uvicorn", "granian", "leg-http")
_OK = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"


# -- the minimal servers (``--serve KIND PORT``) ----------------------------------------------


class _AllowProtocol(asyncio.Protocol):
    """The least an HTTP/1.1 call-out server does: parse with httptools, answer 200."""

    def __init__(self) -> None:
        import httptools

        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.headers: list[tuple[bytes, bytes]] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        import httptools

        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            assert self.transport is not None
            self.transport.write(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
            self.transport.close()

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_message_complete(self) -> None:
        assert self.transport is not None
        self.headers = []
        self.transport.write(_OK)


async def asgi_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"0")]}
    )
    await send({"type": "http.response.body", "body": b""})


async def rsgi_app(scope: Any, proto: Any) -> None:
    proto.response_empty(200, [])


async def _serve_protocol(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_AllowProtocol, "127.0.0.1", port)
    print(f"ready {port}", flush=True)
    await server.serve_forever()


async def _serve_legation(kind: str, port: int, workdir: Path) -> None:
    from legation.extauthz import service as authz

    floor._register_plugins()
    config = workdir / "authz.yaml"
    config.write_text(json.dumps({"checks": {"allow": {"type": "allow"}}}))
    if kind == "leg-grpc":
        server, bound = await authz.start_server(authz.Settings(config_file=config))
        print(f"ready {bound}", flush=True)
        await server.wait_for_termination()
        return
    from legation.fastpath import server as fast

    running = await fast.start_server(fast.Settings(config_file=config, port=port))
    print(f"ready {running.port}", flush=True)
    await running.serve_forever()


def serve(kind: str, port: int, workdir: Path) -> None:
    if kind == "h-asyncio":
        asyncio.run(_serve_protocol(port))
    elif kind == "h-uvloop":
        import uvloop

        uvloop.run(_serve_protocol(port))
    elif kind == "uvicorn":
        import uvicorn

        print(f"ready {port}", flush=True)
        uvicorn.run(
            asgi_app,
            host="127.0.0.1",
            port=port,
            loop="uvloop",
            http="httptools",
            lifespan="off",
            access_log=False,
            log_level="warning",
            interface="asgi3",
        )
    elif kind == "granian":
        granian = Path(sys.executable).with_name("granian")
        print(f"ready {port}", flush=True)
        os.execv(
            granian,
            [
                str(granian),
                "--interface",
                "rsgi",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                "1",
                "--runtime-threads",
                "1",
                "--no-ws",
                "--log-level",
                "warning",
                "bench.http_callout:rsgi_app",
            ],
        )
    elif kind in ("leg-grpc", "leg-http"):
        from legation import _loop

        _loop.run(_serve_legation(kind, port, workdir))  # the loop ``legation serve`` runs
    else:
        raise SystemExit(f"unknown server {kind!r}")


# -- set-up -----------------------------------------------------------------------------------


def front_bootstrap(
    ports: Mapping[str, int], services: Mapping[str, int], upstream: int, admin: int
) -> dict[str, Any]:
    from legation.extauthz import envoy_filter as grpc_ef
    from legation.fastpath import envoy_filter as http_ef

    listeners = []
    clusters: list[dict[str, Any]] = [
        floor._plain(http_ef.http_cluster("upstream", [("127.0.0.1", upstream)]))
    ]
    for name in ROWS:
        route: dict[str, Any] = {"match": {"prefix": "/"}, "route": {"cluster": "upstream"}}
        filters: list[dict[str, Any]] = []
        if name in HTTP_ROWS:
            callout = http_ef.Callout(cluster=name)
            filters.append(floor._plain(http_ef.http_filter(callout)))
            route = http_ef.route_dict(route, callout.name, policy="floor", checks=["allow"])
            clusters.append(
                floor._plain(http_ef.http_cluster(name, [("127.0.0.1", services[name])]))
            )
        elif name != "plain":
            filters.append(floor._plain(grpc_ef.http_filter(name)))
            route["typed_per_filter_config"] = {
                grpc_ef.FILTER_NAME: floor._plain(
                    grpc_ef.per_route_any(policy="floor", checks=["allow"])
                )
            }
            clusters.append(
                floor._plain(grpc_ef.grpc_cluster(name, [("127.0.0.1", services[name])]))
            )
        listeners.append(floor._listener(name, ports[name], route, filters))
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {"listeners": listeners, "clusters": clusters},
    }


def tree_cpu(pid: int) -> float:
    """CPU seconds of ``pid`` and its descendants (granian runs its worker as a child)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        try:
            total += floor.cpu_seconds(p)
        except OSError:
            continue
        todo.extend(children.get(p, ()))
    return total


def start(kind: str, workdir: Path) -> tuple[subprocess.Popen[str], int]:
    if kind == "grpc-min":
        proc = floor.start_service("authz-min", workdir / kind)
    else:
        (workdir / kind).mkdir()
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.http_callout",
                "--serve",
                kind,
                str(free_port()),
                str(workdir / kind),
            ],
            cwd=floor.REPO,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
            env={**os.environ, "GRPC_VERBOSITY": "ERROR"},
        )
    line = proc.stdout.readline() if proc.stdout else ""
    if not line.startswith("ready "):
        proc.kill()
        raise RuntimeError(f"server {kind} did not start")
    return proc, int(line.split()[1])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        serve(sys.argv[2], int(sys.argv[3]), Path(sys.argv[4]))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--only", help="comma-separated rows (plain is always measured)")
    args = ap.parse_args()
    rows_run = (
        ROWS
        if not args.only
        else tuple(n for n in ROWS if n == "plain" or n in args.only.split(","))
    )

    from legation.envoy_process import EnvoyProcess

    workdir = Path(tempfile.mkdtemp(prefix="bench-http-callout-"))
    procs: dict[str, subprocess.Popen[str]] = {}
    envoys: list[EnvoyProcess] = []
    try:
        services = {}
        for kind in rows_run[1:]:
            procs[kind], services[kind] = start(kind, workdir)
        ports = {name: free_port() for name in ROWS}
        services = {**dict.fromkeys(ROWS[1:], 1), **services}  # rows not run: never called
        up_port, up_admin, admin = free_port(), free_port(), free_port()
        _, front = floor.start_envoys(
            front_bootstrap(ports, services, up_port, admin),
            up_port=up_port,
            up_admin=up_admin,
            admin=admin,
            workdir=workdir,
            prefix="callout",
            envoys=envoys,
            listeners=[ports[name] for name in rows_run],
        )
        assert front.proc is not None
        print(
            f"wrk -t1 -c{args.connections} -d{args.seconds}s, front Envoy --concurrency 1, "
            f"{args.rounds} round(s); load average {os.getloadavg()[0]:.2f} before",
            flush=True,
        )
        rows: dict[str, list[dict[str, float]]] = {n: [] for n in rows_run}
        for r in range(args.rounds):
            for name in rows_run:
                pids = {"front": front.proc.pid}
                if name in procs:
                    pids["service"] = procs[name].pid
                before = {k: tree_cpu(p) for k, p in pids.items()}
                rps, _ = floor.wrk(ports[name], args.seconds, args.connections, 1)
                n = rps * args.seconds
                row = {"rps": rps}
                for k, p in pids.items():
                    row[f"{k}_us"] = (tree_cpu(p) - before[k]) / n * 1e6
                rows[name].append(row)
                print(f"  round {r + 1} {name:10s} {rps:8.0f} rps", flush=True)
        print_table(rows)
        failed = {
            k: v
            for k, v in front.stats(r"ext_authz\.(error|failure_mode_allowed|denied)").items()
            if v
        }
        print(
            "Envoy saw no call-out errors or denials"
            if not failed
            else f"call-out errors/denials: {failed}"
        )
    finally:
        for e in envoys:
            e.stop()
        for kind, p in procs.items():
            if kind == "grpc-min":
                p.kill()
            else:
                os.killpg(p.pid, signal.SIGKILL)  # its own session: granian forks a worker
            p.wait()


def print_table(rows: Mapping[str, list[dict[str, float]]]) -> None:
    def med(name: str, key: str) -> float:
        return floor.median(rows, name, key)

    base = med("plain", "rps")
    print(
        f"\n{'path':11s}{'rps':>8s}{'spread':>14s}{'/plain':>8s}{'svc us/check':>14s}"
        f"{'front us/req':>14s}"
    )
    for name in rows:
        rps = [r["rps"] for r in rows[name]]
        svc = f"{med(name, 'service_us'):14.0f}" if name != "plain" else f"{'-':>14s}"
        print(
            f"{name:11s}{med(name, 'rps'):8.0f}{f'{min(rps):.0f}-{max(rps):.0f}':>14s}"
            f"{med(name, 'rps') / base:8.2f}{svc}{med(name, 'front_us'):14.0f}"
        )
    if os.environ.get("BENCH_JSON"):
        print(json.dumps(rows))


if __name__ == "__main__":
    main()
