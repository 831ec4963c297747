"""1 vs N worker processes of a Legation service behind the real Envoy, and how Envoy spreads the
calls over them, side by side in one run.

    .venv/bin/python -m bench.workers [--kind authz|proc] [--workers 2] [--seconds 4] [--rounds 2]
                                      [--connections 16] [--envoy-concurrency 2]

One front Envoy (``--concurrency`` from ``--envoy-concurrency``) proxies every listener to an
upstream Envoy answering ``direct_response`` (as :mod:`bench.floor`); each listener calls the same
service (``authz``: Legation's ext_authz with one check that always allows; ``proc``: its
ext_proc with a chain of one no-op filter) laid out differently:

  plain        proxying only (the limit)
  one          1 worker
  reuse        N workers sharing one port (SO_REUSEPORT); the cluster lists that one address
  reuse-mcs    the same N workers; the cluster caps HTTP/2 ``max_concurrent_streams`` at 2, so
               Envoy opens more connections and the kernel hands each to one worker
  endpoints    N workers, worker i on ``port + 100 i``; the cluster lists one endpoint per
               worker (what ``legation up`` does)

Per row: rps, ratio to ``one``, each worker's share of the calls (its own request counter,
before and after the window: a share of 0 % is a worker Envoy never reached) and CPU per request
of each worker and of the front Envoy (from /proc). Rounds repeat the sequence; the median is
shown. The workers are real processes started the way ``legation serve`` starts the service.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench import floor
from legation.envoy_process import EnvoyProcess

ROWS = ("plain", "one", "reuse", "reuse-mcs", "endpoints")
COUNTER = {"authz": "legation_extauthz_decisions_total", "proc": "legation_extproc_streams_total"}


# -- a worker process (``--serve KIND PORT REUSE DIR``) -----------------------------------------


async def _serve(kind: str, port: int, reuse: bool, workdir: Path) -> None:
    from prometheus_client import start_http_server

    floor._register_plugins()
    workdir.mkdir(parents=True, exist_ok=True)
    server: Any
    if kind == "authz":
        from legation.extauthz import service as authz

        config = workdir / "authz.yaml"
        config.write_text(json.dumps({"checks": {"allow": {"type": "allow"}}}))
        settings = authz.Settings(config_file=config, port=port, reuse_port=reuse)
        server, bound = await authz.start_server(settings)
    else:
        from legation.extproc import service as proc

        config = workdir / "chains.yaml"
        config.write_text(json.dumps(floor._chains_doc()))
        settings = proc.Settings(config_file=config, port=port, reuse_port=reuse)
        server, bound = await proc.start_server(settings)
    metrics, _ = start_http_server(0, addr="127.0.0.1")
    print(f"ready {bound} {metrics.server_port}", flush=True)
    await server.wait_for_termination()


class Worker:
    def __init__(self, kind: str, port: int, reuse: bool, workdir: Path) -> None:
        command = [sys.executable, "-m", "bench.workers", "--serve", kind, str(port)]
        self.proc = subprocess.Popen(
            [*command, str(int(reuse)), str(workdir)],
            cwd=floor.REPO,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "GRPC_VERBOSITY": "ERROR"},
        )
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if not line.startswith("ready "):
            raise RuntimeError(f"a {kind} worker on port {port} did not start")
        self.port, self.metrics = (int(x) for x in line.split()[1:])

    def calls(self, kind: str) -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics}/metrics", timeout=5) as r:
            text = r.read().decode()
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith(COUNTER[kind] + "{") or line.startswith(COUNTER[kind] + " ")
        )

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


# -- the front Envoy ------------------------------------------------------------------------


def front_bootstrap(
    kind: str, ports: dict[str, int], clusters: dict[str, dict[str, Any]], upstream: int, admin: int
) -> dict[str, Any]:
    from legation.extauthz import envoy_filter as authz_ef
    from legation.extproc import envoy_filter as proc_ef
    from legation.extproc.config import build_chains

    floor._register_plugins()
    chain = build_chains(floor._chains_doc()).chains[floor.CHAIN]
    plain = floor._plain
    listeners = []
    address = {"socket_address": {"address": "127.0.0.1", "port_value": upstream}}
    out: list[dict[str, Any]] = [
        {
            "name": "upstream",
            "type": "STATIC",
            "connect_timeout": "1s",
            "load_assignment": {
                "cluster_name": "upstream",
                "endpoints": [{"lb_endpoints": [{"endpoint": {"address": address}}]}],
            },
        }
    ]
    for name in ROWS:
        route: dict[str, Any] = {"match": {"prefix": "/"}, "route": {"cluster": "upstream"}}
        filters: list[dict[str, Any]] = []
        if name != "plain" and kind == "authz":
            filters.append(plain(authz_ef.http_filter(name)))
            route["typed_per_filter_config"] = {
                authz_ef.FILTER_NAME: plain(authz_ef.per_route_any(policy="w", checks=["allow"]))
            }
        elif name != "plain":
            filters.append(plain(proc_ef.http_filter(name)))
            route["typed_per_filter_config"] = {
                k: plain(v) for k, v in proc_ef.typed_per_filter_config(chain).items()
            }
        if name != "plain":
            out.append(clusters[name])
        listeners.append(floor._listener(name, ports[name], route, filters))
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {"listeners": listeners, "clusters": out},
    }


def _cluster(name: str, ports: list[int], max_streams: int | None = None) -> dict[str, Any]:
    from legation import envoy_grpc

    endpoints = [("127.0.0.1", p) for p in ports]
    cluster = envoy_grpc.grpc_cluster(name, endpoints, max_concurrent_streams=max_streams)
    return floor._plain(cluster)


# -- measuring --------------------------------------------------------------------------------


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        kind, port, reuse, workdir = sys.argv[2:6]
        asyncio.run(_serve(kind, int(port), reuse == "1", Path(workdir)))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kind", choices=["authz", "proc"], default="authz")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seconds", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--envoy-concurrency", type=int, default=2)
    args = ap.parse_args()
    from tests.conftest import free_port, worker_base_port

    kind, n = args.kind, args.workers
    workdir = Path(tempfile.mkdtemp(prefix="bench-workers-"))
    groups: dict[str, list[Worker]] = {}
    envoys: list[EnvoyProcess] = []
    try:
        groups["one"] = [Worker(kind, 0, False, workdir / "one")]
        shared = free_port()
        groups["reuse"] = [Worker(kind, shared, True, workdir / f"reuse{i}") for i in range(n)]
        groups["reuse-mcs"] = groups["reuse"]
        base = worker_base_port(n)
        groups["endpoints"] = [
            Worker(kind, base + 100 * i, False, workdir / f"ep{i}") for i in range(n)
        ]
        clusters = {
            "one": _cluster("one", [groups["one"][0].port]),
            "reuse": _cluster("reuse", [shared]),
            "reuse-mcs": _cluster("reuse-mcs", [shared], max_streams=2),
            "endpoints": _cluster("endpoints", [w.port for w in groups["endpoints"]]),
        }
        up_port, up_admin, admin = free_port(), free_port(), free_port()
        ports = {name: free_port() for name in ROWS}
        upstream = EnvoyProcess(
            floor.upstream_bootstrap(up_port, up_admin),
            admin_port=up_admin,
            name="workers-upstream",
            log_dir=workdir,
        ).start()
        envoys.append(upstream)
        front = EnvoyProcess(
            front_bootstrap(kind, ports, clusters, up_port, admin),
            admin_port=admin,
            name="workers-front",
            log_dir=workdir,
            concurrency=args.envoy_concurrency,
        ).start()
        envoys.append(front)
        upstream.wait_live()
        front.wait_live()
        deadline = time.monotonic() + 20
        for name in ROWS:
            floor.wait_ok(ports[name], deadline)
        assert front.proc is not None
        print(
            f"{kind}: {n} workers; wrk -t1 -c{args.connections} -d{args.seconds}s; front Envoy "
            f"--concurrency {args.envoy_concurrency}; {args.rounds} round(s); load average "
            f"{os.getloadavg()[0]:.2f} before",
            flush=True,
        )
        rows: dict[str, list[dict[str, Any]]] = {name: [] for name in ROWS}
        for _ in range(args.rounds):
            for name in ROWS:
                rows[name].append(_measure(name, ports[name], groups.get(name, []), front, args))
        _print(rows, n)
    finally:
        for envoy in envoys:
            envoy.stop()
        for worker in {id(w): w for ws in groups.values() for w in ws}.values():
            worker.stop()


def _measure(
    name: str, port: int, workers: list[Worker], front: EnvoyProcess, args: argparse.Namespace
) -> dict[str, Any]:
    assert front.proc is not None
    calls0 = [w.calls(args.kind) for w in workers]
    cpu0 = [floor.cpu_seconds(w.proc.pid) for w in workers]
    front0 = floor.cpu_seconds(front.proc.pid)
    rps, _ = floor.wrk(port, args.seconds, args.connections, 1)
    calls = [w.calls(args.kind) - c for w, c in zip(workers, calls0, strict=True)]
    cpu = [floor.cpu_seconds(w.proc.pid) - c for w, c in zip(workers, cpu0, strict=True)]
    total = rps * args.seconds
    return {
        "rps": rps,
        "share": [c / max(1.0, sum(calls)) for c in calls],
        "cpu_us": [1e6 * c / k if k else None for c, k in zip(cpu, calls, strict=True)],
        "service_us": 1e6 * sum(cpu) / max(1.0, total),
        "front_us": 1e6 * (floor.cpu_seconds(front.proc.pid) - front0) / max(1.0, total),
    }


def _print(rows: dict[str, list[dict[str, Any]]], n: int) -> None:
    import statistics

    def med(name: str, key: str) -> float:
        return statistics.median(r[key] for r in rows[name])

    one = med("one", "rps")
    print(
        f"\n{'row':<10} {'rps':>8} {'x one':>6}  {'share per worker':<22} "
        f"{'CPU/call per worker (us)':<26} {'service/req':>11} {'front/req':>9}"
    )
    for name in ROWS:
        rps = med(name, "rps")
        last = rows[name][-1]
        shares = " ".join(f"{100 * s:.0f}%" for s in last.get("share", [])) or "-"
        cpus = " ".join("-" if c is None else f"{c:.0f}" for c in last.get("cpu_us", [])) or "-"
        service = f"{med(name, 'service_us'):.0f} us" if name != "plain" else "-"
        print(
            f"{name:<10} {rps:>8.0f} {rps / one:>6.2f}  {shares:<22} {cpus:<26} "
            f"{service:>11} {med(name, 'front_us'):>6.0f} us"
        )
    spread = [min(r["share"]) for r in rows["reuse"]]
    print(
        f"\nreuse: the least-used of {n} workers got {', '.join(f'{100 * s:.0f}%' for s in spread)}"
        " of the calls per round (0%: Envoy's connections all landed on other workers)"
    )


if __name__ == "__main__":
    main()
