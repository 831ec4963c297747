"""ext_authz benchmark, side by side in one run, through the real Envoy.

Scenarios (one Envoy, one listener each, direct_response so no upstream limits the numbers):
  none       no authorization (the limit)
  native     Envoy's jwt_authn + rbac enforcing the same rule (role claim == guest)
  trivial    ext_authz to a Python servicer that always allows (the floor of any call-out)
  jwt        Legation ext_authz, JWT check only
  jwt+rego   Legation ext_authz, JWT + the shipped envoy.authz Rego policy
The Python scenarios run with 1 and 2 service processes sharing a port (SO_REUSEPORT, as
``--workers``); with 2, the gRPC clusters cap max_concurrent_streams so that Envoy opens several
connections, and the decisions each process served are printed to show the spread.
Per scenario: saturation rps (wrk -c16), latency percentiles at a fixed 1,000 rps (h2load --rps,
per-request log), and the service's handler-time percentiles (from its Prometheus histogram).

    .venv/bin/python -m bench.extauthz [--seconds 4]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import jwt as pyjwt
from cryptography.hazmat.primitives.asymmetric import rsa

from legation.envoy_process import EnvoyProcess
from legation.extauthz import envoy_filter
from tests.conftest import free_port
from tests.extauthz.conftest import to_plain

REPO = Path(__file__).resolve().parents[1]
ISSUER = "https://bench.test"
STREAMS_PER_CONNECTION = 2


def serve_trivial(port: int, metrics_port: int) -> None:
    """A trivial servicer process (``--serve-trivial``): always allows, counts its calls."""
    import grpc
    from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
    from prometheus_client import Counter, start_http_server

    calls = Counter("legation_extauthz_decisions", "calls", ["policy", "result"]).labels(
        "trivial", "allow"
    )
    start_http_server(metrics_port, addr="127.0.0.1")

    class Trivial(external_auth_pb2_grpc.AuthorizationServicer):
        async def Check(self, request: Any, context: Any) -> Any:
            calls.inc()
            response = external_auth_pb2.CheckResponse()
            response.status.code = 0
            return response

    async def main() -> None:
        server = grpc.aio.server(options=[("grpc.so_reuseport", 1)])
        external_auth_pb2_grpc.add_AuthorizationServicer_to_server(Trivial(), server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()

    asyncio.run(main())


def serve(port: int, metrics_port: int, jwks_path: str) -> None:
    """A service worker process (``--serve``)."""
    from prometheus_client import start_http_server

    from legation.extauthz.service import Settings, start_server

    config = {
        "checks": {
            "jwt": {
                "type": "jwt",
                "options": {
                    "providers": [
                        {
                            "name": "bench",
                            "issuer": ISSUER,
                            "audiences": ["legation"],
                            "jwks_file": jwks_path,
                        }
                    ]
                },
            },
            "authz": {
                "type": "rego",
                "options": {"policy_dir": str(REPO / "policies"), "reload_interval_s": 0},
            },
        }
    }
    start_http_server(metrics_port, addr="127.0.0.1")

    async def main() -> None:
        server, _ = await start_server(Settings(port=port, reuse_port=True, config=config))
        await server.wait_for_termination()

    asyncio.run(main())


def hcm(prefix: str, filters: list[dict[str, Any]], per_route: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager"
            ".v3.HttpConnectionManager",
            "stat_prefix": prefix,
            "codec_type": "AUTO",
            "route_config": {
                "virtual_hosts": [
                    {
                        "name": "all",
                        "domains": ["*"],
                        "routes": [
                            {
                                "match": {"prefix": "/"},
                                "direct_response": {"status": 200, "body": {"inline_string": "ok"}},
                                "typed_per_filter_config": per_route,
                            }
                        ],
                    }
                ]
            },
            "http_filters": [
                *filters,
                {
                    "name": "envoy.filters.http.router",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"  # noqa: E501
                    },
                },
            ],
        },
    }


def bootstrap(
    ports: dict[str, int],
    admin: int,
    authz_port: int,
    trivial_port: int,
    jwks: dict[str, Any],
    streams: int,
) -> dict[str, Any]:
    ext = to_plain(envoy_filter.http_filter("extauthz"))
    trivial = to_plain(envoy_filter.http_filter("trivial"))
    jwt_authn = {
        "name": "envoy.filters.http.jwt_authn",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",  # noqa: E501
            "providers": {
                "bench": {
                    "issuer": ISSUER,
                    "audiences": ["legation"],
                    "local_jwks": {"inline_string": json.dumps(jwks)},
                    "payload_in_metadata": "jwt",
                }
            },
            "rules": [{"match": {"prefix": "/"}, "requires": {"provider_name": "bench"}}],
        },
    }
    rbac = {
        "name": "envoy.filters.http.rbac",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC",
            "rules": {
                "action": "ALLOW",
                "policies": {
                    "guests": {
                        "permissions": [
                            {
                                "and_rules": {
                                    "rules": [
                                        {
                                            "header": {
                                                "name": ":method",
                                                "string_match": {"exact": "GET"},
                                            }
                                        },
                                        {"url_path": {"path": {"exact": "/people"}}},
                                    ]
                                }
                            }
                        ],
                        "principals": [
                            {
                                "metadata": {
                                    "filter": "envoy.filters.http.jwt_authn",
                                    "path": [{"key": "jwt"}, {"key": "role"}],
                                    "value": {"string_match": {"exact": "guest"}},
                                }
                            }
                        ],
                    }
                },
            },
        },
    }
    chains = {
        "none": hcm("none", [], {}),
        "native": hcm("native", [jwt_authn, rbac], {}),
        "trivial": hcm("trivial", [trivial], {}),
        "jwt": hcm(
            "jwt",
            [ext],
            {
                envoy_filter.FILTER_NAME: to_plain(
                    envoy_filter.per_route_any(policy="jwt-only", checks=["jwt"])
                )
            },
        ),
        "jwt+rego": hcm(
            "rego",
            [ext],
            {
                envoy_filter.FILTER_NAME: to_plain(
                    envoy_filter.per_route_any(policy="envoy.authz", checks=["jwt", "authz"])
                )
            },
        ),
    }
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {
            "listeners": [
                {
                    "name": n,
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": ports[n]}},
                    "filter_chains": [{"filters": [chains[n]]}],
                }
                for n in chains
            ],
            "clusters": [
                to_plain(
                    envoy_filter.grpc_cluster(
                        name, [("127.0.0.1", port)], max_concurrent_streams=streams
                    )
                )
                for name, port in (("extauthz", authz_port), ("trivial", trivial_port))
            ],
        },
    }


def wrk(port: int, token: str, seconds: int) -> float:
    out = subprocess.run(
        [
            "wrk",
            "-t1",
            "-c16",
            f"-d{seconds}s",
            "-H",
            f"Authorization: Bearer {token}",
            f"http://127.0.0.1:{port}/people",
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 30,
    ).stdout
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if non2xx:
        raise RuntimeError(f"wrk saw {non2xx.group(1)} non-2xx responses:\n{out}")
    return float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]


def fixed_rate(port: int, token: str, seconds: int, tmp: Path) -> dict[str, float]:
    log = tmp / f"h2load-{port}.log"
    subprocess.run(
        [
            "h2load",
            "-c4",
            "--rps=250",
            f"-D{seconds}",
            f"--log-file={log}",
            "-H",
            f"authorization: Bearer {token}",
            f"http://127.0.0.1:{port}/people",
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 30,
        check=True,
    )
    rows = [line.split("\t") for line in log.read_text().splitlines() if line.strip()]
    ok = sorted(int(r[2]) / 1000 for r in rows if r[1] == "200")  # duration in us -> ms
    if len(ok) != len(rows) or not ok:
        raise RuntimeError(f"fixed-rate run: {len(rows) - len(ok)} of {len(rows)} not 200")
    return {f"p{p}": ok[min(len(ok) - 1, int(len(ok) * p / 100))] for p in (50, 90, 99)}


def decisions_per_process(metrics_ports: list[int]) -> list[int]:
    out = []
    for mp in metrics_ports:
        text = urllib.request.urlopen(f"http://127.0.0.1:{mp}/metrics", timeout=5).read().decode()
        out.append(
            int(
                sum(
                    float(m.group(1))
                    for m in re.finditer(
                        r"^legation_extauthz_decisions_total\{[^}]*\} ([\d.e+]+)$",
                        text,
                        re.MULTILINE,
                    )
                )
            )
        )
    return out


def handler_percentiles(metrics_ports: list[int]) -> dict[str, float]:
    """Approximate p50/p99 (upper bucket bound, ms) of the summed handler histograms."""
    buckets: dict[float, float] = {}
    for mp in metrics_ports:
        text = urllib.request.urlopen(f"http://127.0.0.1:{mp}/metrics", timeout=5).read().decode()
        for m in re.finditer(
            r'legation_extauthz_handler_seconds_bucket\{le="([^"]+)",'
            r'policy="[^"]*"\} ([\d.e+]+)',
            text,
        ):
            le = float(m.group(1))
            buckets[le] = buckets.get(le, 0) + float(m.group(2))
    total = buckets.get(float("inf"), 0)
    out = {}
    for p in (50, 99):
        out[f"p{p}"] = next(
            (le * 1000 for le, c in sorted(buckets.items()) if total and c >= total * p / 100),
            float("nan"),
        )
    return out


def run_workers(
    workers: int,
    seconds: int,
    tmp: Path,
    token: str,
    jwks: dict[str, Any],
    results: dict[str, Any],
    include_native: bool,
) -> None:
    jwks_path = tmp / "jwks.json"
    jwks_path.write_text(json.dumps(jwks))
    authz_port, trivial_port = free_port(), free_port()
    metrics_ports = [free_port() for _ in range(workers)]
    trivial_metrics = [free_port() for _ in range(workers)]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.extauthz",
                "--serve",
                str(authz_port),
                str(mp),
                str(jwks_path),
            ],
            cwd=REPO,
        )
        for mp in metrics_ports
    ]
    procs += [
        subprocess.Popen(
            [sys.executable, "-m", "bench.extauthz", "--serve-trivial", str(trivial_port), str(mp)],
            cwd=REPO,
        )
        for mp in trivial_metrics
    ]
    ports = {n: free_port() for n in ("none", "native", "trivial", "jwt", "jwt+rego")}
    admin = free_port()
    # 16 requests in flight, 2 streams per connection: Envoy opens ~8 connections, which the
    # kernel spreads over the SO_REUSEPORT processes (uncapped: one connection, one process)
    streams = STREAMS_PER_CONNECTION if workers > 1 else 0
    envoy = EnvoyProcess(
        bootstrap(ports, admin, authz_port, trivial_port, jwks, streams),
        admin_port=admin,
        name=f"bench-{workers}",
        log_dir=tmp / f"e{workers}",
    )
    try:
        envoy.start()
        envoy.wait_live()
        deadline = time.monotonic() + 15
        for probe in ("jwt", "trivial"):  # wait until the workers answer through Envoy
            while True:
                try:
                    urllib.request.urlopen(
                        urllib.request.Request(
                            f"http://127.0.0.1:{ports[probe]}/people",
                            headers={"authorization": f"Bearer {token}"},
                        ),
                        timeout=2,
                    )
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
        names = ["none", "native"] if include_native else []
        for name in [*names, "trivial", "jwt", "jwt+rego"]:
            label = name if name in ("none", "native") else f"{name} (workers={workers})"
            before = decisions_per_process(trivial_metrics if name == "trivial" else metrics_ports)
            rps = wrk(ports[name], token, seconds)
            lat = fixed_rate(ports[name], token, seconds, tmp)
            after = decisions_per_process(trivial_metrics if name == "trivial" else metrics_ports)
            spread = [a - b for a, b in zip(after, before, strict=True)]
            results[label] = {"rps": rps, "latency_ms": lat}
            if name not in ("none", "native"):
                results[label]["per_process"] = spread
            print(
                f"  {label:24s} {rps:9.0f} rps   p50 {lat['p50']:.2f} ms  "
                f"p90 {lat['p90']:.2f} ms  p99 {lat['p99']:.2f} ms"
                + (f"   calls per process {spread}" if name not in ("none", "native") else ""),
                flush=True,
            )
        results[f"handler (workers={workers})"] = handler_percentiles(metrics_ports)
    finally:
        envoy.stop()
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        serve(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--serve-trivial":
        serve_trivial(int(sys.argv[2]), int(sys.argv[3]))
        return
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=4)
    args = parser.parse_args()
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = {
        **json.loads(pyjwt.algorithms.RSAAlgorithm.to_jwk(key.public_key())),
        "kid": "k1",
        "alg": "RS256",
        "use": "sig",
    }
    jwks = {"keys": [jwk]}
    now = int(time.time())
    token = pyjwt.encode(
        {
            "iss": ISSUER,
            "aud": "legation",
            "sub": "alice",
            "role": "guest",
            "iat": now,
            "exp": now + 3600,
        },
        key,
        algorithm="RS256",
        headers={"kid": "k1"},
    )
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-extauthz-") as d:
        tmp = Path(d)
        print(f"GET /people, 16 connections for saturation, 1,000 rps fixed, {args.seconds} s each")
        run_workers(1, args.seconds, tmp, token, jwks, results, include_native=True)
        run_workers(2, args.seconds, tmp, token, jwks, results, include_native=False)
    base = results["none"]["rps"]
    print("\nratio to no authz (saturation rps), and to the trivial servicer (the floor):")
    for label, r in results.items():
        if "rps" in r:
            floor = (
                results.get(f"trivial (workers={label[-2]})", {}).get("rps")
                if label.endswith("=1)") or label.endswith("=2)")
                else None
            )
            vs_floor = f"   {r['rps'] / floor:5.2f} of trivial" if floor else ""
            print(f"  {label:24s} {r['rps'] / base:5.2f}{vs_floor}")
    for w in (1, 2):
        h = results[f"handler (workers={w})"]
        print(
            f"service handler time, workers={w} (histogram bucket bounds): "
            f"p50 <= {h['p50']:.2f} ms, p99 <= {h['p99']:.2f} ms"
        )
    if os.environ.get("BENCH_JSON"):
        print(json.dumps(results))


if __name__ == "__main__":
    main()
