"""Rate limiting through the real Envoy, side by side in one run.

    .venv/bin/python -m bench.ratelimit [--seconds 5] [--rps 1000]

One front Envoy (``--concurrency 1``) proxies to an upstream that is a second Envoy answering
``direct_response`` in its own process (as in :mod:`bench.floor`), so the upstream costs little
and is never Python. Three set-ups, one after the other:

* ``envoy-local``: Envoy's native local_ratelimit (no call-out; the limit),
* ``legation-memory``: the ratelimit filter calling Legation's service, memory backend,
* ``legation-redis``: the same with the Redis backend, on a redis-server this bench starts on a
  free loopback port (no persistence) and stops.

The service runs in its own process, started exactly as an operator would: ``legation serve
ratelimit --config limits.yaml --listen 127.0.0.1:0 [--backend redis --redis-url ...]
--metrics-port N`` (the CLI's ``_serve_one`` -> ``start_server``, default Prometheus registry,
config hot reload on). Nothing of it runs in the bench process.

For each: latency percentiles at a fixed rate (h2load ``--rps``, per-request log), the highest
rate (wrk -t1 -c16), the service process's CPU per request in both phases (``/proc/<pid>/stat``),
and for Redis the round trips per decision (the service's
``legation_ratelimit_backend_round_trips_total``, scraped) and the script calls per decision
(Redis ``INFO commandstats``: evalsha + eval). Limits are high enough that nothing is refused,
so every request is one decision. Ratios are against envoy-local. About 3 x (2 x seconds + 4) s.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import redis

from bench.floor import cpu_seconds, upstream_bootstrap
from legation.envoy_process import EnvoyProcess
from legation.ratelimit import envoy_filter as ef
from tests.conftest import free_port
from tests.ratelimit.harness import bootstrap

LIMITS = """
domain: edge
descriptors:
  - key: generic_key
    value: bench
    descriptors:
      - key: user
        rate_limit: {unit: hour, requests_per_unit: 1000000000}
"""
ROUTES = [("/", [ef.GenericKey("bench"), ef.RequestHeader("x-user", "user")])]
CASES = ("envoy-local", "legation-memory", "legation-redis")
NAN = float("nan")


def fixed_rate(port: int, rps: int, seconds: int, workdir: Path) -> dict[str, float]:
    clients = 10  # h2load paces each client; clients fire together, so more clients = bigger bursts
    log = workdir / f"h2load-{port}.log"
    subprocess.run(
        [
            "h2load",
            "--h1",
            "-c",
            str(clients),
            "--rps",
            str(rps // clients),
            "-D",
            str(seconds),
            "-H",
            "x-user: bench",
            "--log-file",
            str(log),
            f"http://127.0.0.1:{port}/",
        ],
        check=True,
        capture_output=True,
        timeout=seconds + 30,
    )
    rows = [line.split("\t") for line in log.read_text().splitlines() if line.strip()]
    lat = sorted(int(r[2]) / 1000 for r in rows)  # ms
    ok = sum(1 for r in rows if r[1] == "200")

    def pct(p: float) -> float:
        return lat[min(len(lat) - 1, int(p * len(lat)))] if lat else NAN

    return {
        "sent_rps": len(rows) / seconds,
        "ok": ok,
        "n": len(rows),
        "p50": pct(0.50),
        "p90": pct(0.90),
        "p99": pct(0.99),
        "max": lat[-1] if lat else 0,
    }


def max_rate(port: int, seconds: int) -> tuple[float, float]:
    """(requests per second, requests) from wrk -t1 -c16."""
    out = subprocess.run(
        ["wrk", "-t1", "-c16", f"-d{seconds}s", "-H", "x-user: bench", f"http://127.0.0.1:{port}/"],
        check=True,
        capture_output=True,
        text=True,
        timeout=seconds + 30,
    ).stdout
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if non2xx:
        print(f"    warning: {non2xx.group(1)} non-2xx answers under max load")
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    return (float(rate.group(1)) if rate else NAN, float(total.group(1)) if total else NAN)


@dataclass
class Service:
    """``legation serve ratelimit`` in its own process."""

    proc: subprocess.Popen[str]
    port: int
    metrics_port: int

    @classmethod
    def start(cls, config: Path, workdir: Path, redis_port: int | None) -> Service:
        metrics_port = free_port()
        cmd = [
            str(Path(sys.executable).with_name("legation")),
            "serve",
            "ratelimit",
            "--config",
            str(config),
            "--listen",
            "127.0.0.1:0",
            "--metrics-port",
            str(metrics_port),
        ]
        if redis_port is not None:
            cmd += ["--backend", "redis", "--redis-url", f"redis://127.0.0.1:{redis_port}/0"]
        err = (workdir / f"service-{'redis' if redis_port else 'memory'}.log").open("w")
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            env={**os.environ, "GRPC_VERBOSITY": "ERROR"},
        )
        line = proc.stdout.readline() if proc.stdout else ""
        match = re.search(r" on [\d.]+:(\d+)$", line.strip())
        if match is None:
            proc.kill()
            raise RuntimeError(f"legation serve ratelimit did not start: {line!r} (see {err.name})")
        return cls(proc, int(match.group(1)), metrics_port)

    def metric(self, name: str) -> float:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5
        ) as r:
            text = r.read().decode()
        found = re.search(rf"^{re.escape(name)}(?:{{[^}}]*}})? ([\d.e+-]+)$", text, re.M)
        return float(found.group(1)) if found else NAN

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def run_case(
    name: str, upstream_port: int, workdir: Path, args: argparse.Namespace, redis_port: int | None
) -> dict[str, float]:
    config = workdir / "limits.yaml"
    config.write_text(LIMITS)
    service = None if name == "envoy-local" else Service.start(config, workdir, redis_port)
    listen, admin = free_port(), free_port()
    envoy = EnvoyProcess(
        bootstrap(
            listen_port=listen,
            admin_port=admin,
            upstream_port=upstream_port,
            routes=ROUTES if service else (),
            rls_port=service.port if service else None,
            local_limit=None if service else 1_000_000,
        ),
        admin_port=admin,
        name=f"bench-{name}",
        log_dir=workdir,
    )
    rclient = redis.Redis(port=redis_port) if redis_port else None
    result: dict[str, float] = {}
    try:
        envoy.start()
        envoy.wait_live()
        subprocess.run(
            ["wrk", "-t1", "-c4", "-d1s", "-H", "x-user: bench", f"http://127.0.0.1:{listen}/"],
            capture_output=True,
            check=False,
        )
        pid = service.proc.pid if service else None
        trips0 = service.metric("legation_ratelimit_backend_round_trips_total") if service else 0
        cmds0 = _script_calls(rclient)
        cpu0 = cpu_seconds(pid) if pid else 0.0
        result = fixed_rate(listen, args.rps, args.seconds, workdir)
        if pid:
            result["svc_us_fixed"] = (cpu_seconds(pid) - cpu0) / result["n"] * 1e6
        if service is not None and rclient is not None:
            trips = service.metric("legation_ratelimit_backend_round_trips_total")
            result["trips_per_decision"] = (trips - trips0) / result["n"]
            result["cmds_per_decision"] = (_script_calls(rclient) - cmds0) / result["n"]
        cpu0 = cpu_seconds(pid) if pid else 0.0
        result["max_rps"], n = max_rate(listen, args.seconds)
        if pid:
            result["svc_us_max"] = (cpu_seconds(pid) - cpu0) / n * 1e6
        if service is None:
            result["limited"] = envoy.stats("local_rate_limit").get(
                "local.http_local_rate_limit.rate_limited", 0
            )
        else:
            stats = envoy.stats("ratelimit")
            result["limited"] = stats.get("cluster.upstream.ratelimit.over_limit", 0)
            result["rls_errors"] = stats.get("cluster.upstream.ratelimit.error", 0) + stats.get(
                "cluster.upstream.ratelimit.failure_mode_allowed", 0
            )
    finally:
        envoy.stop()
        if service is not None:
            service.stop()
    return result


def _script_calls(client: redis.Redis | None) -> int:
    if client is None:
        return 0
    # script calls sent by clients (commands run inside the script are not round trips)
    stats = client.info("commandstats")
    return sum(int(stats.get(f"cmdstat_{c}", {}).get("calls", 0)) for c in ("evalsha", "eval"))


def start_redis(workdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    proc = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
        ],
        stdout=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while True:
        try:
            redis.Redis(port=port).ping()
            return proc, port
        except redis.ConnectionError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise
            time.sleep(0.05)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--rps", type=int, default=1000)
    args = parser.parse_args()
    for tool in ("h2load", "wrk", "redis-server"):
        if shutil.which(tool) is None:
            raise SystemExit(f"bench needs {tool}")
    workdir = Path(tempfile.mkdtemp(prefix="bench-ratelimit-"))
    up_port, up_admin = free_port(), free_port()
    upstream = EnvoyProcess(
        upstream_bootstrap(up_port, up_admin),
        admin_port=up_admin,
        name="bench-upstream",
        log_dir=workdir,
    )
    redis_proc = None
    results: dict[str, dict[str, float]] = {}
    try:
        upstream.start()
        upstream.wait_live()
        redis_proc, redis_port = start_redis(workdir)
        for name in CASES:
            print(f"  measuring {name} ...", flush=True)
            results[name] = run_case(
                name, up_port, workdir, args, redis_port if name == "legation-redis" else None
            )
    finally:
        upstream.stop()
        if redis_proc is not None:
            redis_proc.terminate()
            redis_proc.wait(10)
    print_table(results, args)


def print_table(results: dict[str, dict[str, float]], args: argparse.Namespace) -> None:
    base = results["envoy-local"]
    print(
        f"\nfixed rate {args.rps} rps for {args.seconds}s (h2load -c10), then max rate "
        f"(wrk -t1 -c16, {args.seconds}s); svc us = service process CPU per request"
    )
    print(
        f"{'setup':<16}{'sent/s':>7}{'p50 ms':>7}{'p90 ms':>7}{'p99 ms':>7}{'p99 x':>6}"
        f"{'max/s':>7}{'x local':>8}{'svc us@fix':>11}{'svc us@max':>11}{'trips/dec':>10}"
        f"{'evals/dec':>10}{'limited':>8}"
    )
    for name, r in results.items():
        print(
            f"{name:<16}{r['sent_rps']:>7.0f}{r['p50']:>7.2f}{r['p90']:>7.2f}{r['p99']:>7.2f}"
            f"{r['p99'] / base['p99']:>6.1f}{r['max_rps']:>7.0f}"
            f"{r['max_rps'] / base['max_rps']:>8.2f}"
            f"{r.get('svc_us_fixed', NAN):>11.0f}{r.get('svc_us_max', NAN):>11.0f}"
            f"{r.get('trips_per_decision', NAN):>10.3f}"
            f"{r.get('cmds_per_decision', NAN):>10.3f}{r['limited']:>8.0f}"
        )
    errors = {n: r["rls_errors"] for n, r in results.items() if r.get("rls_errors")}
    print(
        "Envoy saw no ratelimit call-out errors"
        if not errors
        else f"ratelimit call-out errors (answered 200 all the same, fail-open): {errors}"
    )


if __name__ == "__main__":
    main()
