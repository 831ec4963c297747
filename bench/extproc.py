"""ext_proc benchmark: header routing five ways, side by side, through the real Envoy.

    .venv/bin/python -m bench.extproc [--seconds 5] [--rate 500]

1. plain      - Envoy proxying, no ext_proc (the limit)
2. native     - the same routing done by Envoy's own route match on the header
3. legation   - Legation ext_proc with ``header_route`` (clears the route cache)
4. sdk        - the ``envoy-extproc-sdk`` package (PyPI 0.1.1) doing the same routing
5. legation-http - the same ``header_route`` decision over Legation's fused HTTP call-out (ext_authz
   in HTTP mode, the route named in the call, the answer sets the header and the filter's
   ``clear_route_cache`` re-picks the route), as ``extauthz: {protocol: http}`` fuses such a
   route. Not ext_proc: the same routing work over another protocol, no stream, no body phases.
6. legation-extproc-http - Legation's ext_proc with the same chain over Envoy's ext_proc HTTP
   transport (``http_service``: each message a POST of proto3 JSON, a filter per chain), as
   ``extproc: {protocol: http}`` serves a request-headers chain. ext_proc, without the stream.

Half of the requests carry ``x-beta: 1`` and must reach the "canary" upstream; each setup is checked
for that before it is measured. Upstreams are a second Envoy answering with direct_response, so the
upstream is never the bottleneck. Each setup: saturation (wrk -c16), the service process's CPU per
request during it, and latency percentiles at a fixed rate (an open-loop asyncio client, latency
measured from the scheduled send time).

envoy-extproc-sdk is not a dependency of Legation, and its own dependencies would disturb the
project's venv, so the bench installs it once into ``.legation/bench/extproc-sdk`` (``pip install
--target``, pinned as below) and puts that folder on the SDK server's path; set
``LEGATION_EXTPROC_SDK_PATH=DIR`` to use another install. If it cannot be installed (no access to
the package index), the sdk row is skipped and the output says so.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from bench._extproc_envoy import (
    EXTPROC_HTTP_FILTER,
    WRK_SCRIPT,
    check,
    direct_listener,
    fixed_rate,
    fused_route,
    listener,
    pct,
    wrk,
)
from bench._extproc_services import (
    CHAINS,
    EXTPROC_HTTP_SERVER,
    HTTP_SERVER,
    LEGATION_SERVER,
    SDK_SERVER,
    sdk_env,
    start,
)
from bench.http_callout import tree_cpu
from legation.envoy_process import EnvoyProcess
from legation.extproc import envoy_filter
from legation.extproc.chain import Chain
from legation.extproc.config import build_chains
from legation.fastpath import envoy_filter as fast_filter
from tests.conftest import free_port
from tests.extproc import harness

__all__ = ["CHAINS", "main"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--rate", type=int, default=500)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-extproc-"))
    script = tmp / "beta.lua"
    script.write_text(WRK_SCRIPT)
    chains = build_chains(CHAINS)
    route_chain: Chain = chains.chains["route"]
    env = dict(os.environ, PYTHONPATH=str(Path.cwd()))
    sdk_environ = sdk_env()
    procs: list[subprocess.Popen[str]] = []
    envoys: list[EnvoyProcess] = []
    try:
        up = {"stable": free_port(), "canary": free_port()}
        upstream_admin = free_port()
        envoys.append(
            EnvoyProcess(
                {
                    "admin": {
                        "address": {
                            "socket_address": {"address": "127.0.0.1", "port_value": upstream_admin}
                        }
                    },
                    "static_resources": {
                        "listeners": [direct_listener(n, p) for n, p in up.items()]
                    },
                },
                admin_port=upstream_admin,
                name="bench-upstreams",
                log_dir=tmp,
            ).start()
        )
        legation_port = free_port()
        procs.append(start(LEGATION_SERVER.replace("{chains}", repr(CHAINS)), legation_port, env))
        http_port = free_port()
        procs.append(start(HTTP_SERVER.replace("{chains}", repr(CHAINS)), http_port, env))
        xhttp_port = free_port()
        procs.append(start(EXTPROC_HTTP_SERVER.replace("{chains}", repr(CHAINS)), xhttp_port, env))
        services = {
            "legation": procs[0].pid,
            "legation-http": procs[1].pid,
            "legation-extproc-http": procs[2].pid,
        }
        sdk_port = free_port()
        if sdk_environ is not None:
            procs.append(start(SDK_SERVER, sdk_port, sdk_environ))
            services["sdk"] = procs[-1].pid
        names = ("plain", "native", "legation", "sdk", "legation-http", "legation-extproc-http")
        ports = {name: free_port() for name in names}
        beta = {"x-legation-cohort": "canary"}

        def rt(
            cluster: str,
            headers: dict[str, str] | None = None,
            chain: Chain | None = None,
            ext: bool = False,
        ) -> dict[str, Any]:
            r = harness.route("/", cluster, chain, headers=headers)
            if not ext:
                r.pop("typed_per_filter_config")
            return r

        native_match = {"prefix": "/", "headers": [{"name": "x-beta", "present_match": True}]}
        listeners = [
            listener("plain", ports["plain"], [rt("stable")], None),
            listener(
                "native",
                ports["native"],
                [{"match": native_match, "route": {"cluster": "canary"}}, rt("stable")],
                None,
            ),
            listener(
                "legation",
                ports["legation"],
                [rt("canary", beta, route_chain, True), rt("stable", None, route_chain, True)],
                "legation",
            ),
        ]
        listeners.append(
            listener(
                "legation-http",
                ports["legation-http"],
                [fused_route("canary", beta), fused_route("stable")],
                "legation-http",
            )
        )
        xhttp = [
            harness.route("/", c, None, headers=h, http_filter=EXTPROC_HTTP_FILTER)
            for c, h in (("canary", beta), ("stable", None))
        ]
        listeners.append(
            listener(
                "legation-extproc-http",
                ports["legation-extproc-http"],
                xhttp,
                "legation-extproc-http",
            )
        )
        if sdk_environ is not None:
            sdk_routes = [
                rt("canary", beta, route_chain, True),
                rt("stable", None, route_chain, True),
            ]
            listeners.append(listener("sdk", ports["sdk"], sdk_routes, "sdk"))
        admin = free_port()
        boot = {
            "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
            "static_resources": {
                "listeners": listeners,
                "clusters": [
                    harness.static_cluster("stable", up["stable"]),
                    harness.static_cluster("canary", up["canary"]),
                    harness.to_dict(
                        envoy_filter.grpc_cluster("legation", "127.0.0.1", legation_port)
                    ),
                    harness.to_dict(envoy_filter.grpc_cluster("sdk", "127.0.0.1", sdk_port)),
                    harness.to_dict(
                        fast_filter.http_cluster("legation-http", [("127.0.0.1", http_port)])
                    ),
                    harness.to_dict(
                        fast_filter.http_cluster(
                            "legation-extproc-http", [("127.0.0.1", xhttp_port)]
                        )
                    ),
                ],
            },
        }
        front = EnvoyProcess(
            json.dumps(boot), admin_port=admin, name="bench-front", log_dir=tmp
        ).start()
        envoys.append(front)
        front.wait_live()
        envoys[0].wait_live()
        rows: dict[str, tuple[float, list[float], float, float]] = {}
        front_pid = front.proc.pid if front.proc is not None else 0
        for name, port in ports.items():
            if name == "sdk" and sdk_environ is None:
                print("sdk: skipped (envoy-extproc-sdk not importable; see module docstring)")
                continue
            check(port, routes=name != "plain")
            pid = services.get(name)
            before, envoy_before = (tree_cpu(pid) if pid else 0.0), tree_cpu(front_pid)
            rps = wrk(port, args.seconds, script)
            done = rps * args.seconds / 1e6 or 1.0  # millions of requests
            cpu = (tree_cpu(pid) - before) / done if pid else 0.0
            envoy = (tree_cpu(front_pid) - envoy_before) / done
            lat = asyncio.run(fixed_rate(port, args.rate, args.seconds))
            rows[name] = (rps, lat, cpu, envoy)
            print(f"{name:9s} measured", flush=True)
        base = rows["plain"][0] or 1.0
        print(
            f"\n{'setup':21s} {'sat rps':>9s} {'ratio':>6s} {'svc us/req':>10s} {'envoy us':>8s}   "
            f"@{args.rate} rps: {'p50 ms':>7s} {'p90 ms':>7s} {'p99 ms':>7s} {'max ms':>7s}"
        )
        for name, (rps, lat, cpu, envoy) in rows.items():
            svc = f"{cpu:10.0f}" if cpu else f"{'-':>10s}"
            print(
                f"{name:21s} {rps:9.0f} {rps / base:6.2f} {svc} {envoy:8.0f}   "
                f"{'':>{len(str(args.rate)) + 6}}"
                f"{pct(lat, 50):7.2f} {pct(lat, 90):7.2f} {pct(lat, 99):7.2f} "
                f"{max(lat) * 1000:7.2f}"
            )
        print(
            "(svc us/req, envoy us: CPU per request of the service process and of the front "
            "Envoy during the saturation run)"
        )
        if "sdk" in rows and rows["sdk"][0]:
            print()
            for name in ("legation", "legation-http", "legation-extproc-http"):
                print(f"{name} / sdk saturation: {rows[name][0] / rows['sdk'][0]:.2f}x")
            cpu = rows["legation-extproc-http"][2], rows["sdk"][2]
            if all(cpu):
                print(f"legation-extproc-http / sdk service CPU per request: {cpu[0] / cpu[1]:.2f}")
        if "native" in rows:
            print(f"legation / native routing: {rows['legation'][0] / rows['native'][0]:.2f}")
    finally:
        for e in envoys:
            e.stop()
        for p in procs:
            p.kill()
            p.wait()


if __name__ == "__main__":
    main()
