"""Rate limiting through the real Envoy, side by side in one run.

    .venv/bin/python -m bench.ratelimit [--seconds 5] [--rps 1000]

Three set-ups behind one Envoy worker in front of the loopback demo upstream:

* ``envoy-local``: Envoy's native local_ratelimit (no call-out; the limit),
* ``legation-memory``: the ratelimit filter calling Legation with the memory backend,
* ``legation-redis``: the same with the Redis backend (a real redis-server on a free port).

For each: latency percentiles at a fixed request rate (h2load ``--rps``, per-request log), the
highest decisions per second (wrk -c16), and for Redis the round trips and Redis commands per
decision. Limits are set high enough that nothing is refused, so every request is one decision.
Ratios are printed against envoy-local. Bounded: ``--seconds`` per measurement.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import redis
from prometheus_client import CollectorRegistry

from legation.demo import DemoApp
from legation.envoy_process import EnvoyProcess
from legation.ratelimit import envoy_filter as ef
from legation.ratelimit.service import Settings
from tests.conftest import free_port
from tests.ratelimit.harness import ServiceThread, bootstrap

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


def fixed_rate(port: int, rps: int, seconds: int, workdir: Path) -> dict[str, float]:
    clients = 10
    log = workdir / f"h2load-{port}.log"
    subprocess.run(
        ["h2load", "--h1", "-c", str(clients), "--rps", str(rps // clients), "-D", str(seconds),
         "-H", "x-user: bench", "--log-file", str(log), f"http://127.0.0.1:{port}/"],
        check=True, capture_output=True, timeout=seconds + 30)
    rows = [line.split("\t") for line in log.read_text().splitlines() if line.strip()]
    lat = sorted(int(r[2]) / 1000 for r in rows)  # ms
    ok = sum(1 for r in rows if r[1] == "200")

    def pct(p: float) -> float:
        return lat[min(len(lat) - 1, int(p * len(lat)))] if lat else float("nan")

    return {"sent_rps": len(rows) / seconds, "ok": ok, "n": len(rows),
            "p50": pct(0.50), "p90": pct(0.90), "p99": pct(0.99), "max": lat[-1] if lat else 0}


def max_rate(port: int, seconds: int) -> float:
    out = subprocess.run(
        ["wrk", "-t1", "-c16", f"-d{seconds}s", "-H", "x-user: bench",
         f"http://127.0.0.1:{port}/"], check=True, capture_output=True, text=True,
        timeout=seconds + 30).stdout
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if non2xx:
        print(f"    warning: {non2xx.group(1)} non-2xx answers under max load")
    match = re.search(r"Requests/sec:\s+([\d.]+)", out)
    return float(match.group(1)) if match else float("nan")


def run_case(name: str, upstream: DemoApp, workdir: Path, args: argparse.Namespace,
             redis_port: int | None = None) -> dict[str, float]:
    service = None
    config = workdir / "limits.yaml"
    config.write_text(LIMITS)
    if name != "envoy-local":
        options = {"backend": "memory"} if redis_port is None else {
            "backend": "redis",
            "backend_options": {"url": f"redis://127.0.0.1:{redis_port}/0", "timeout_ms": 200}}
        service = ServiceThread(Settings(config_paths=(str(config),), reload_interval=0,
                                         metrics_registry=CollectorRegistry(),
                                         **options)).start()  # type: ignore[arg-type]
    listen, admin = free_port(), free_port()
    envoy = EnvoyProcess(
        bootstrap(listen_port=listen, admin_port=admin, upstream_port=upstream.port,
                  routes=ROUTES if service else (), rls_port=service.port if service else None,
                  local_limit=None if service else 1_000_000),
        admin_port=admin, name=f"bench-{name}", log_dir=workdir)
    result: dict[str, float] = {}
    rclient = redis.Redis(port=redis_port) if redis_port else None
    try:
        envoy.start()
        envoy.wait_live()
        subprocess.run(["wrk", "-t1", "-c4", "-d1s", f"http://127.0.0.1:{listen}/"],
                       capture_output=True, check=False)  # warm-up
        backend = service.call(lambda: service.server.legation_limiter.backend) if service else None
        trips0 = getattr(backend, "round_trips", 0)
        cmds0 = _commands(rclient)
        result = fixed_rate(listen, args.rps, args.seconds, workdir)
        if backend is not None and hasattr(backend, "round_trips"):
            decisions = result["n"]
            result["trips_per_decision"] = (backend.round_trips - trips0) / decisions
            result["cmds_per_decision"] = (_commands(rclient) - cmds0) / decisions
        result["max_rps"] = max_rate(listen, args.seconds)
        if name == "envoy-local":
            stats = envoy.stats("local_rate_limit")
            result["limited"] = stats.get("local.http_local_rate_limit.rate_limited", 0)
        else:
            result["limited"] = envoy.stats("ratelimit").get(
                "cluster.upstream.ratelimit.over_limit", 0)
    finally:
        envoy.stop()
        if service:
            service.stop()
    return result


def _commands(client: redis.Redis | None) -> int:
    if client is None:
        return 0
    # script calls sent by clients (commands run inside the script are not round trips)
    stats = client.info("commandstats")
    return sum(int(stats.get(f"cmdstat_{c}", {}).get("calls", 0)) for c in ("evalsha", "eval"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--rps", type=int, default=1000)
    args = parser.parse_args()
    for tool in ("h2load", "wrk", "redis-server"):
        if shutil.which(tool) is None:
            raise SystemExit(f"bench needs {tool}")
    workdir = Path(tempfile.mkdtemp(prefix="bench-ratelimit-"))
    upstream = DemoApp(name="upstream").start_in_thread()
    redis_port = free_port()
    redis_proc = subprocess.Popen(
        ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(workdir)], stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                redis.Redis(port=redis_port).ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        results = {}
        for name, rport in (("envoy-local", None), ("legation-memory", None),
                            ("legation-redis", redis_port)):
            print(f"  measuring {name} ...", flush=True)
            results[name] = run_case(name, upstream, workdir, args, rport)
    finally:
        redis_proc.kill()
        redis_proc.wait()
        upstream.stop_thread()
    base = results["envoy-local"]
    print(f"\nfixed rate {args.rps} rps for {args.seconds}s (h2load), then max rate (wrk -c16)")
    print(f"{'setup':<17}{'sent/s':>8}{'p50 ms':>8}{'p90 ms':>8}{'p99 ms':>8}{'max/s':>9}"
          f"{'x local':>9}{'p99 x':>7}{'trips/dec':>10}{'evals/dec':>10}{'limited':>8}")
    for name, r in results.items():
        print(f"{name:<17}{r['sent_rps']:>8.0f}{r['p50']:>8.2f}{r['p90']:>8.2f}{r['p99']:>8.2f}"
              f"{r['max_rps']:>9.0f}{r['max_rps'] / base['max_rps']:>9.2f}"
              f"{r['p99'] / base['p99']:>7.1f}"
              f"{r.get('trips_per_decision', float('nan')):>10.3f}"
              f"{r.get('cmds_per_decision', float('nan')):>10.3f}{r['limited']:>8.0f}")


if __name__ == "__main__":
    main()
