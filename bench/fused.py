"""Fused decisions vs the three-call chain, through the real `legation up` stack, one run.

    .venv/bin/python -m bench.fused [--seconds 4] [--rounds 2] [--connections 16] [--rate 1000]

Two `legation up` stacks side by side (each a gateway Envoy, ``--concurrency 1``, the control
plane and one process per request-path service), routing to one upstream Envoy answering
``direct_response``. The same mesh, once with ``extauthz.protocol: grpc`` (the chain) and once
with ``protocol: http`` (the fast path, fused where a route fits), rows measured one after the
other with ``wrk``, rounds interleaved:

  plain        a route that asks for nothing (proxying only: the limit)
  authz-grpc   JWT (RS256) + Rego (decision cache) over the gRPC ext_authz call-out
  authz-http   the same checks over the HTTP call-out (``--callout socket``, the default: on a
               Unix socket, ``extauthz.http_socket``; ``tcp``: on ``http_port``)
  chain        authz + header_route (ext_proc) + rate limit: three gRPC call-outs in a row
  fused        the same route, one HTTP call (``legation explain`` says: 1 hop, fused)

Per row: saturation rps (``wrk -c16``) and its ratio to plain, p50/p99 latency at a fixed rate
(``wrk`` paced by a Lua ``delay()``: each connection waits connections/rate between requests;
not corrected for coordinated omission, so it reads low when the stack falls behind), and CPU
per request of each process (user + system from /proc, whole process tree for Legation's).
Rate limits are counted (memory backend) but set high enough never to refuse. Non-2xx answers
(a check that timed out under the machine's other load) are counted and printed; over 1 % of a
run fails it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jwt as pyjwt
import yaml
from cryptography.hazmat.primitives.asymmetric import rsa

from bench import floor
from bench.http_callout import tree_cpu
from tests.conftest import free_port

ROWS = {  # row -> (stack, path)
    "plain": ("fused", "/plain"),
    "authz-grpc": ("chain", "/authz"),
    "authz-http": ("fused", "/authz"),
    "chain": ("chain", "/three"),
    "fused": ("fused", "/three"),
}
POLICY = """package bench.authz
import rego.v1

default allow := false
allow if input.attributes.request.http.headers["x-role"] == "admin"
"""
COHORT = [
    {
        "name": "header_route",
        "options": {
            "header": "x-legation-cohort",
            "rules": [{"header": "x-user", "one_of": ["alice"], "value": "beta"}],
        },
    }
]


def upstream_bootstrap(ports: tuple[int, int], admin: int) -> dict[str, Any]:
    """bench.floor's direct_response upstream, on two ports (the mesh's v1 and v2 endpoints)."""
    config = floor.upstream_bootstrap(ports[0], admin)
    second = json.loads(json.dumps(config["static_resources"]["listeners"][0]))
    second["name"] = "upstream-v2"
    second["address"]["socket_address"]["port_value"] = ports[1]
    config["static_resources"]["listeners"].append(second)
    return config


def write_stack(
    folder: Path,
    *,
    http: bool,
    upstream: tuple[int, int],
    jwk: dict[str, Any],
    callout: str = "socket",
) -> int:
    """A mesh folder for one stack; returns its gateway port."""
    (folder / "policies").mkdir(parents=True)
    (folder / "policies" / "authz.rego").write_text(POLICY)
    limit = {"unit": "second", "requests_per_unit": 1_000_000_000}
    (folder / "ratelimit.yaml").write_text(
        yaml.safe_dump(
            {
                "domain": "mesh",
                "descriptors": [
                    {
                        "key": "generic_key",
                        "value": "bench",
                        "descriptors": [{"key": "user", "rate_limit": limit}],
                    }
                ],
            }
        )
    )
    provider = {"name": "b", "issuer": "bench", "audiences": "any", "jwks": {"keys": [jwk]}}
    (folder / "authz.yaml").write_text(
        yaml.safe_dump(
            {
                "checks": {
                    "jwt": {"type": "jwt", "options": {"providers": [provider]}},
                    "rego": {"type": "rego", "options": {"policy_dir": "policies"}},
                },
                "default_checks": ["jwt", "rego"],
            }
        )
    )
    p = {n: free_port() for n in ("xds", "status", "gw", "admin", "authz", "http", "proc", "rl")}
    # timeouts well above saturation's queueing, so rows measure throughput, not 403s
    # one worker per service on both stacks (1 vs N workers is bench/floor.py's): the fused
    # routes' memory counters need it, and the comparison stays process for process
    authz: dict[str, Any] = {
        "port": p["authz"],
        "config": "authz.yaml",
        "timeout": "5s",
        "workers": 1,
    }
    if http:
        where = (
            {"http_socket": str(folder.resolve() / "authz.sock")}
            if callout == "socket"
            else {"http_port": p["http"]}
        )
        authz.update(protocol="http", http_headers={"request": ["x-role"]}, **where)
    limits = [
        {
            "actions": [
                {"generic_key": {"value": "bench"}},
                {"request_headers": {"header": "x-user", "key": "user"}},
            ]
        }
    ]
    checked = {"authz": "bench.authz", "filters": COHORT, "rate_limits": limits}
    mesh = {
        "xds": {"port": p["xds"]},
        "mtls": {"mode": "off"},
        "gateway": {"name": "gw", "port": p["gw"], "admin_port": p["admin"]},
        "extauthz": authz,
        "extproc": {"port": p["proc"], "timeout": "5s", "workers": 1},
        "ratelimit": {
            "port": p["rl"],
            "config": "ratelimit.yaml",
            "domain": "mesh",
            "timeout": "5s",
        },
        "services": [
            {
                "name": "up",
                "port": 80,
                "subsets": [
                    {"name": "v1", "labels": {"v": "1"}},
                    {"name": "v2", "labels": {"v": "2"}},
                ],
                "endpoints": [
                    {"port": upstream[0], "labels": {"v": "1"}},
                    {"port": upstream[1], "labels": {"v": "2"}},
                ],
            }
        ],
        "routes": [
            {"name": "plain", "match": {"path": {"prefix": "/plain"}}, "to": {"service": "up"}},
            {
                "name": "authz",
                "match": {"path": {"prefix": "/authz"}},
                "to": {"service": "up"},
                "authz": "bench.authz",
            },
            {
                "name": "three-beta",
                "to": {"service": "up", "subset": "v2"},
                "match": {
                    "path": {"prefix": "/three"},
                    "headers": [{"name": "x-legation-cohort", "exact": "beta"}],
                },
                **checked,
            },
            {
                "name": "three",
                "match": {"path": {"prefix": "/three"}},
                "to": {"service": "up", "subset": "v1"},
                **checked,
            },
        ],
    }
    (folder / "mesh.yaml").write_text(yaml.safe_dump(mesh))
    (folder / "status.port").write_text(str(p["status"]))
    return p["gw"]


def start_stack(folder: Path) -> subprocess.Popen[bytes]:
    port = (folder / "status.port").read_text()
    log = (folder / "up.log").open("wb")
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "legation.cli",
            "up",
            "--plain",
            "--status-port",
            port,
            "--log-dir",
            str(folder / "logs"),
            str(folder / "mesh.yaml"),
        ],
        cwd=folder,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def processes(folder: Path) -> dict[str, int]:
    """role -> pid of the stack's gateway Envoy and request-path service processes."""
    port = int((folder / "status.port").read_text())
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=5) as r:
        status = json.load(r)
    return {
        p["role"]: p["pid"]
        for p in status.get("processes", [])
        if p["role"] in ("envoy", "extauthz", "extproc", "ratelimit")
    }


def wait_answers(port: int, path: str, headers: Mapping[str, str], deadline: float) -> None:
    while True:
        try:
            req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=dict(headers))
            with urllib.request.urlopen(req, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path} on :{port} never answered 200")
        time.sleep(0.2)


def wrk(
    port: int,
    path: str,
    headers: Mapping[str, str],
    *,
    seconds: int,
    connections: int,
    script: Path | None = None,
) -> tuple[float, int, dict[str, float], int]:
    """(rps, requests, latency percentiles in ms, non-2xx answers) of one wrk run; more than 1 %
    non-2xx raises (a check timing out now and then under a shared machine's load is counted and
    printed; a broken row is not measured)."""
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency"]
    for k, v in headers.items():
        cmd += ["-H", f"{k}: {v}"]
    if script is not None:
        cmd += ["-s", str(script)]
    out = subprocess.run(
        [*cmd, f"http://127.0.0.1:{port}{path}"],
        capture_output=True,
        text=True,
        timeout=seconds + 30,
    ).stdout
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = int(bad.group(1)) if bad else 0
    if rate is None or total is None or errors > int(total.group(1)) // 100:
        raise RuntimeError(f"wrk {path}: no rate or over 1 % non-2xx answers:\n{out}")
    lat = {}
    for pct in ("50", "99"):
        m = re.search(rf"\s{pct}(?:\.000)?%\s+([\d.]+)(us|ms|s)", out)
        if m:
            lat[pct] = float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]
    return float(rate.group(1)), int(total.group(1)), lat, errors


def measure(
    name: str,
    port: int,
    path: str,
    headers: Mapping[str, str],
    pids: Mapping[str, int],
    args: argparse.Namespace,
    paced: Path,
) -> dict[str, float]:
    before = {role: tree_cpu(pid) for role, pid in pids.items()}
    rps, total, _, errors = wrk(
        port, path, headers, seconds=args.seconds, connections=args.connections
    )
    row: dict[str, float] = {"rps": rps, "errors": errors}
    for role, pid in pids.items():
        used = tree_cpu(pid) - before[role]
        if used > 0.001 * args.seconds:
            row[f"cpu_{role}"] = used / total * 1e6  # us per request
    _, _, lat, late = wrk(port, path, headers, seconds=args.seconds, connections=10, script=paced)
    row.update({f"p{k}": v for k, v in lat.items()})
    row["errors"] += late
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--rate", type=int, default=1000, help="requests/s for the latency runs")
    ap.add_argument(
        "--callout",
        choices=("socket", "tcp"),
        default="socket",
        help="where the HTTP call-out listens: extauthz.http_socket or http_port",
    )
    args = ap.parse_args()

    from legation.envoy_process import EnvoyProcess

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = {
        **json.loads(pyjwt.algorithms.RSAAlgorithm.to_jwk(key.public_key())),
        "kid": "k",
        "alg": "RS256",
        "use": "sig",
    }
    token = pyjwt.encode(
        {"iss": "bench", "sub": "u", "exp": int(time.time()) + 86400},
        key,
        algorithm="RS256",
        headers={"kid": "k"},
    )
    headers = {"authorization": f"Bearer {token}", "x-role": "admin", "x-user": "bob"}
    workdir = Path(tempfile.mkdtemp(prefix="bench-fused-"))
    paced = workdir / "paced.lua"
    paced.write_text(f"function delay() return {10 * 1000 / args.rate:.3f} end\n")
    up_ports, up_admin = (free_port(), free_port()), free_port()
    upstream = EnvoyProcess(
        upstream_bootstrap(up_ports, up_admin),
        admin_port=up_admin,
        name="bench-upstream",
        log_dir=workdir,
    ).start()
    stacks: dict[str, subprocess.Popen[bytes]] = {}
    try:
        upstream.wait_live()
        gateways = {}
        for name in ("chain", "fused"):
            gateways[name] = write_stack(
                workdir / name,
                http=name == "fused",
                upstream=up_ports,
                jwk=jwk,
                callout=args.callout,
            )
            stacks[name] = start_stack(workdir / name)
        deadline = time.monotonic() + 60
        for stack, path in ROWS.values():
            wait_answers(gateways[stack], path, headers, deadline)
        pids = {name: processes(workdir / name) for name in stacks}
        rows: dict[str, list[dict[str, float]]] = {r: [] for r in ROWS}
        for _ in range(args.rounds):
            for row, (stack, path) in ROWS.items():
                rows[row].append(
                    measure(row, gateways[stack], path, headers, pids[stack], args, paced)
                )
        print_table(rows, args)
    finally:
        for proc in stacks.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGINT)
        for proc in stacks.values():
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        upstream.stop()


def print_table(rows: Mapping[str, list[dict[str, float]]], args: argparse.Namespace) -> None:
    med = floor.median
    plain = med(rows, "plain", "rps")
    chain = med(rows, "chain", "rps")
    print(
        f"\n{args.rounds} rounds x {args.seconds}s, wrk -c{args.connections}; latency at "
        f"{args.rate} rps (10 paced connections); CPU in us per request; HTTP call-out on "
        f"{'a Unix socket' if args.callout == 'socket' else 'loopback TCP'}"
    )
    print(
        f"{'row':<11} {'rps':>7} {'vs plain':>8} {'p50 ms':>7} {'p99 ms':>7} {'non-2xx':>7}  "
        "CPU per request"
    )
    for name in rows:
        rps = med(rows, name, "rps")
        cpu = ", ".join(
            f"{role} {value:.0f}"
            for role in ("envoy", "extauthz", "extproc", "ratelimit")
            if (value := med(rows, name, f"cpu_{role}")) >= 2  # idle processes: not listed
        )
        print(
            f"{name:<11} {rps:>7.0f} {rps / plain:>8.2f} {med(rows, name, 'p50'):>7.2f} "
            f"{med(rows, name, 'p99'):>7.2f} {sum(r['errors'] for r in rows[name]):>7.0f}  {cpu}"
        )

    def cpu(row: str) -> float:
        return sum(
            v
            for role in ("envoy", "extauthz", "extproc", "ratelimit")
            if (v := med(rows, row, f"cpu_{role}")) == v  # NaN: not measured
        )

    # chain and fused run one after the other in each round: their ratio per round, then the
    # median, moves less with the other load on the machine than a ratio of medians
    per_round = statistics.median(
        f["rps"] / c["rps"] for c, f in zip(rows["chain"], rows["fused"], strict=True)
    )
    print(
        f"\nfused / chain: {med(rows, 'fused', 'rps') / chain:.2f}x, median of per-round "
        f"ratios {per_round:.2f}x (target >= 2)"
    )
    print(
        f"CPU per request, all processes: chain {cpu('chain'):.0f} us, fused "
        f"{cpu('fused'):.0f} us ({cpu('chain') / cpu('fused'):.1f}x less)"
    )
    print(f"authz-http / plain: {med(rows, 'authz-http', 'rps') / plain:.2f} (target >= 0.5)")
    print(
        f"fused p99 / plain p99 at {args.rate} rps: "
        f"{med(rows, 'fused', 'p99') / med(rows, 'plain', 'p99'):.2f} (target <= 2)"
    )


if __name__ == "__main__":
    main()
