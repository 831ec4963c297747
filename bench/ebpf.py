"""App -> sidecar -> sidecar -> app on one host: explicit ports, with and without the eBPF splice.

    .venv/bin/python -m bench.ebpf [--seconds 4] [--rounds 3] [--connections 16] [--rate 1000]

Two identical stacks run side by side, each: the client (wrk / h2load, standing in for app A) ->
sidecar A (Envoy, outbound listener) -> sidecar B (Envoy, inbound listener) -> app B (an Envoy
answering ``direct_response``), all on 127.0.0.1 with explicit ports, every Envoy
``--concurrency 1``, plain HTTP/1.1. The second stack runs every process, the client included,
in the cgroup of a :class:`legation.capture.ebpf.Sockmap`, so each of the three loopback hops is
spliced by the sk_msg program; the first is outside it (today's path). Per round and stack:
``wrk -t1 -cN`` (requests/s), then ``h2load --h1`` at a fixed rate (p50/p99 in ms), and CPU per
request of the three Envoys and of the client (/proc and getrusage over the wrk window). The
table shows medians over the rounds; the ratio is the median of the per-round ratios (the two
stacks are measured back to back in each round, so a noisy neighbour hits both alike). The
splice counters are printed so the eBPF rows are seen to have been spliced. Needs root, clang,
libbpf-dev and bpftool (``make system-deps``); everything is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.floor import _listener, cpu_seconds, upstream_bootstrap, wait_ok
from legation.capture.ebpf import Sockmap
from legation.envoy_process import EnvoyProcess

REPO = Path(__file__).resolve().parents[1]
STACKS = ("explicit", "ebpf")
Join = Callable[[], None] | None


def _cluster(name: str, port: int) -> dict[str, Any]:
    address = {"socket_address": {"address": "127.0.0.1", "port_value": port}}
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": address}}]}],
        },
    }


def sidecar_bootstrap(name: str, port: int, target: int, admin: int) -> dict[str, Any]:
    """An Envoy with one HTTP listener on ``port`` routing everything to 127.0.0.1:``target``."""
    route = {"match": {"prefix": "/"}, "route": {"cluster": "next"}}
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {
            "listeners": [_listener(name, port, route, [])],
            "clusters": [_cluster("next", target)],
        },
    }


def start_stack(
    label: str, workdir: Path, envoys: list[EnvoyProcess], join: Join
) -> tuple[int, list[EnvoyProcess]]:
    """App B, sidecar B, sidecar A (in that order, each joined to the cgroup when ``join``);
    returns sidecar A's port (where the client sends) and the three Envoys."""
    from tests.conftest import distinct_ports

    p = distinct_ports("app", "app_admin", "b", "b_admin", "a", "a_admin")
    configs = [
        (f"{label}-app", upstream_bootstrap(p["app"], p["app_admin"]), p["app_admin"]),
        (
            f"{label}-sidecar-b",
            sidecar_bootstrap("inbound", p["b"], p["app"], p["b_admin"]),
            p["b_admin"],
        ),
        (
            f"{label}-sidecar-a",
            sidecar_bootstrap("outbound", p["a"], p["b"], p["a_admin"]),
            p["a_admin"],
        ),
    ]
    mine = []
    for name, config, admin in configs:
        envoy = EnvoyProcess(config, admin_port=admin, name=name, log_dir=workdir, join=join)
        envoys.append(envoy.start())
        mine.append(envoy)
    for envoy in mine:
        envoy.wait_live()
    wait_ok(p["a"], time.monotonic() + 20)
    return p["a"], mine


def _client_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def wrk(port: int, seconds: int, connections: int, join: Join) -> dict[str, float]:
    command = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", f"http://127.0.0.1:{port}/"]
    out = subprocess.run(
        command, capture_output=True, text=True, timeout=seconds + 30, preexec_fn=join, check=True
    ).stdout
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    if rate is None or total is None or "Non-2xx" in out or "Socket errors" in out:
        raise RuntimeError(f"wrk on port {port}: no rate, errors or non-2xx answers:\n{out}")
    return {"rps": float(rate.group(1)), "requests": float(total.group(1))}


def fixed_rate(port: int, seconds: int, rate: int, join: Join, tmp: Path) -> dict[str, float]:
    """p50/p99 (ms) of ``rate`` requests/s over 4 HTTP/1.1 connections (h2load's rate is per
    connection); any answer but 200 fails the run."""
    log = tmp / f"h2load-{port}.log"
    log.unlink(missing_ok=True)
    command = ["h2load", "--h1", "-c4", f"--rps={rate / 4:g}", f"-D{seconds}"]
    subprocess.run(
        [*command, f"--log-file={log}", f"http://127.0.0.1:{port}/"],
        capture_output=True, text=True, timeout=seconds + 30, preexec_fn=join, check=True,
    )  # fmt: skip
    rows = [line.split("\t") for line in log.read_text().splitlines() if line.strip()]
    ok = sorted(int(r[2]) / 1000 for r in rows if r[1] == "200")  # us -> ms
    if len(ok) != len(rows) or not ok:
        raise RuntimeError(
            f"fixed-rate run on {port}: {len(rows) - len(ok)} of {len(rows)} not 200"
        )
    return {f"p{p}": ok[min(len(ok) - 1, int(len(ok) * p / 100))] for p in (50, 99)}


def measure(
    port: int, envoys: list[EnvoyProcess], args: argparse.Namespace, join: Join, tmp: Path
) -> dict[str, float]:
    pids = [e.proc.pid for e in envoys if e.proc is not None]
    envoy_cpu, client_cpu = sum(cpu_seconds(p) for p in pids), _client_cpu()
    row = wrk(port, args.seconds, args.connections, join)
    envoy_cpu = sum(cpu_seconds(p) for p in pids) - envoy_cpu
    client_cpu = _client_cpu() - client_cpu
    row["envoy_us"] = envoy_cpu / row["requests"] * 1e6
    row["client_us"] = client_cpu / row["requests"] * 1e6
    row.update(fixed_rate(port, args.seconds, args.rate, join, tmp))
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--rate", type=int, default=1000, help="requests/s for the latency run")
    args = ap.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="bench-ebpf-"))
    splice = Sockmap(name=f"bench-{os.getpid()}")
    envoys: list[EnvoyProcess] = []
    try:
        splice.start()
        joins: dict[str, Join] = {"explicit": None, "ebpf": splice.preexec()}
        stacks = {s: start_stack(s, workdir, envoys, joins[s]) for s in STACKS}
        print(
            f"wrk -t1 -c{args.connections} -d{args.seconds}s; h2load --h1 -c4 at {args.rate} rps; "
            f"{args.rounds} round(s); load average {os.getloadavg()[0]:.2f} before",
            flush=True,
        )
        rows: dict[str, list[dict[str, float]]] = {s: [] for s in STACKS}
        for _ in range(args.rounds):
            for s in STACKS:
                port, mine = stacks[s]
                rows[s].append(measure(port, mine, args, joins[s], workdir))
        counters = splice.stats()
    finally:
        for envoy in envoys:
            envoy.stop()
        splice.stop()
    print_table(rows, counters)
    out = REPO / "bench" / "results" / "ebpf.json"
    out.write_text(json.dumps({"args": vars(args), "rounds": rows, "splice": counters}, indent=2))


def print_table(rows: dict[str, list[dict[str, float]]], counters: dict[str, int]) -> None:
    def med(stack: str, key: str) -> float:
        return statistics.median(r[key] for r in rows[stack])

    lines = [
        ("requests/s (wrk)", "rps", "{:,.0f}"),
        ("p50 at fixed rate (ms)", "p50", "{:.3f}"),
        ("p99 at fixed rate (ms)", "p99", "{:.3f}"),
        ("CPU per request, 3 Envoys (us)", "envoy_us", "{:.0f}"),
        ("CPU per request, client (us)", "client_us", "{:.0f}"),
    ]

    def ratio(key: str) -> float:  # per round (both stacks measured back to back), then median
        return statistics.median(
            e[key] / x[key] for x, e in zip(rows["explicit"], rows["ebpf"], strict=True)
        )

    print(f"\n{'':34}{'explicit':>12}{'eBPF':>12}{'eBPF/explicit':>15}")
    for label, key, fmt in lines:
        a, b = med("explicit", key), med("ebpf", key)
        print(f"{label:34}{fmt.format(a):>12}{fmt.format(b):>12}{ratio(key):>15.2f}")
    print(
        f"\nsplice counters: {counters['recorded']} sockets recorded, {counters['spliced']:,} "
        f"messages spliced, {counters['passed']:,} sent the normal way"
    )


if __name__ == "__main__":
    main()
