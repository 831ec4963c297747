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
import re
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from bench.http_callout import tree_cpu
from legation.envoy_process import EnvoyProcess
from legation.extproc import envoy_filter
from legation.extproc.chain import Chain
from legation.extproc.config import build_chains
from legation.fastpath import envoy_filter as fast_filter
from tests.conftest import free_port
from tests.extproc import harness

CHAINS = {
    "chains": {
        "route": {
            "filters": [
                {
                    "name": "header_route",
                    "options": {
                        "header": "x-legation-cohort",
                        "default": "stable",
                        "rules": [{"header": "x-beta", "present": True, "value": "canary"}],
                    },
                }
            ]
        }
    }
}

LEGATION_SERVER = """
import asyncio, sys
from legation.extproc.config import build_chains
from legation.extproc.service import Settings, start_server
async def main():
    settings = Settings(port=int(sys.argv[1]), chains=build_chains({chains}))
    server, port = await start_server(settings)
    print("ready", flush=True)
    await server.wait_for_termination()
asyncio.run(main())
"""

HTTP_SERVER = """
import asyncio, sys
from legation.extproc.config import build_chains
from legation.fastpath.fused import FusedDecider, FusedRoute, FusedRoutes
from legation.fastpath.server import Settings, start_server
async def main():
    chain = build_chains({chains}).chains["route"]
    routes = FusedRoutes({"route": FusedRoute("route", None, tuple(chain.filters), ())})
    settings = Settings(port=int(sys.argv[1]), config={"checks": {}}, fused=FusedDecider(routes))
    server = await start_server(settings)
    print("ready", flush=True)
    await server.serve_forever()
asyncio.run(main())
"""

EXTPROC_HTTP_SERVER = """
import asyncio, sys
from legation.extproc.config import build_chains
from legation.extproc.http_server import HttpSettings, serve_http
from legation.extproc.metrics import Metrics
from legation.extproc.processor import Processor
async def main():
    processor = Processor(build_chains({chains}), metrics=Metrics(), message_timeout=0.2)
    listening = await serve_http(processor, HttpSettings(port=int(sys.argv[1])))
    print("ready", flush=True)
    await listening.server.serve_forever()
asyncio.run(main())
"""

SDK_SERVER = """
import asyncio, sys, logging
import grpc_health, grpc_health.v1, grpc_health.v1.health_pb2, grpc_health.v1.health_pb2_grpc
# envoy-extproc-sdk 0.1.1 imports the health stubs under their old package name
for name in ("", ".v1", ".v1.health_pb2", ".v1.health_pb2_grpc"):
    sys.modules["grpc_health_check" + name] = sys.modules["grpc_health" + name]
import grpc
from envoy_extproc_sdk import BaseExtProcService
from envoy_extproc_sdk.util.envoy import add_ExternalProcessorServicer_to_server
logging.disable(logging.CRITICAL)

from envoy.config.core.v3.base_pb2 import HeaderValue, HeaderValueOption

# Envoy 1.40 sends and expects raw_value; the SDK's get_header/add_header use the old string
# value, so the handler touches the protobufs itself (the SDK still runs the stream and phases).
class Route(BaseExtProcService):
    async def process_request_headers(self, headers, context, request, response):
        beta = any(h.key == "x-beta" for h in headers.headers.headers)
        value = b"canary" if beta else b"stable"
        response.header_mutation.set_headers.append(HeaderValueOption(
            header=HeaderValue(key="x-legation-cohort", raw_value=value)))
        response.clear_route_cache = True
        return response

async def main():
    server = grpc.aio.server()
    add_ExternalProcessorServicer_to_server(Route(), server)
    server.add_insecure_port(f"127.0.0.1:{sys.argv[1]}")
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()
asyncio.run(main())
"""

WRK_SCRIPT = """
local i = 0
request = function()
  i = i + 1
  if i % 2 == 0 then return wrk.format(nil, nil, {["x-beta"] = "1"}) end
  return wrk.format()
end
"""


def _direct(name: str, port: int) -> dict[str, Any]:
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager"
        ".v3.HttpConnectionManager",
        "stat_prefix": name,
        "route_config": {
            "virtual_hosts": [
                {
                    "name": name,
                    "domains": ["*"],
                    "routes": [
                        {
                            "match": {"prefix": "/"},
                            "direct_response": {"status": 200, "body": {"inline_string": name}},
                        }
                    ],
                }
            ]
        },
        "http_filters": [
            {
                "name": "envoy.filters.http.router",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                },
            }
        ],
    }
    return {
        "name": name,
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [
            {
                "filters": [
                    {"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}
                ]
            }
        ],
    }


# the fused call-out as the translation builds it for a fused header_route: the header it reads
# sent to the server, the route named in the call, the answer's header applied, route re-picked
CALLOUT = fast_filter.Callout(
    cluster="legation-http", allowed_headers=("x-beta",), clear_route_cache=True
)


def _fused_route(cluster: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
    r = harness.route("/", cluster, None, headers=headers)
    r["typed_per_filter_config"] = {
        fast_filter.FILTER_NAME: harness.to_dict(fast_filter.per_route_any(CALLOUT, route="route"))
    }
    return r


EXTPROC_HTTP_FILTER = "legation.ext_proc.http.route"


def _listener(
    name: str,
    port: int,
    routes: list[dict[str, Any]],
    ext_cluster: str | None,
) -> dict[str, Any]:
    filters = [
        {
            "name": "envoy.filters.http.router",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
            },
        }
    ]
    if ext_cluster == "legation-http":
        filters.insert(0, harness.to_dict(fast_filter.http_filter(CALLOUT)))
    elif ext_cluster == "legation-extproc-http":
        chain = build_chains(CHAINS).chains["route"]
        f = envoy_filter.http_transport_filter(EXTPROC_HTTP_FILTER, ext_cluster, chain)
        filters.insert(0, harness.to_dict(f))
    elif ext_cluster:
        filters.insert(0, harness.to_dict(envoy_filter.http_filter(ext_cluster)))
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager"
        ".v3.HttpConnectionManager",
        "stat_prefix": name,
        "route_config": {"virtual_hosts": [{"name": name, "domains": ["*"], "routes": routes}]},
        "http_filters": filters,
    }
    return {
        "name": name,
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [
            {
                "filters": [
                    {"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}
                ]
            }
        ],
    }


def _start(code: str, port: int, env: dict[str, str]) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(port)], stdout=subprocess.PIPE, env=env, text=True
    )
    line = proc.stdout.readline() if proc.stdout else ""
    if "ready" not in line:
        proc.kill()
        raise RuntimeError(f"service on {port} did not start")
    return proc


SDK_TARGET = Path(__file__).resolve().parent.parent / ".legation" / "bench" / "extproc-sdk"
SDK_PACKAGES = [
    "envoy-extproc-sdk==0.1.1",
    "ddtrace<2",
    "envier",
    "bytecode",
    "wrapt",
    "opentelemetry-api",
    "protoc-gen-validate==0.4.2",
    "xmltodict",
    "cattrs",
    "six",
    "grpcio-health-checking",
]


def _install_sdk() -> str | None:
    """Install the SDK beside the project (not into its venv) once; its folder, or None."""
    if (SDK_TARGET / "envoy_extproc_sdk").is_dir():
        return str(SDK_TARGET)
    print(f"  installing envoy-extproc-sdk into {SDK_TARGET} (once) ...")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--target",
            str(SDK_TARGET),
            "--no-deps",
            *SDK_PACKAGES,
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if done.returncode != 0:
        print("  could not install envoy-extproc-sdk:", done.stderr.strip().splitlines()[-1:])
        return None
    return str(SDK_TARGET)


def _sdk_env() -> dict[str, str] | None:
    # ddtrace is imported by the SDK; no agent runs here, so tracing and telemetry are off.
    env = dict(
        os.environ,
        DD_TRACE_ENABLED="false",
        DD_INSTRUMENTATION_TELEMETRY_ENABLED="false",
        DD_REMOTE_CONFIGURATION_ENABLED="false",
    )
    extra = os.environ.get("LEGATION_EXTPROC_SDK_PATH") or _install_sdk()
    if extra:
        env["PYTHONPATH"] = extra + os.pathsep + env.get("PYTHONPATH", "")
    shim = SDK_SERVER.split("import grpc\n", 1)[0]
    probe = subprocess.run(
        [sys.executable, "-c", shim + "import envoy_extproc_sdk\n"], env=env, capture_output=True
    )
    return env if probe.returncode == 0 else None


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


def _pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(p / 100 * len(s)))] * 1000


def _check(port: int, *, routes: bool) -> None:
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
    sdk_env = _sdk_env()
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
                    "static_resources": {"listeners": [_direct(n, p) for n, p in up.items()]},
                },
                admin_port=upstream_admin,
                name="bench-upstreams",
                log_dir=tmp,
            ).start()
        )
        legation_port = free_port()
        procs.append(_start(LEGATION_SERVER.replace("{chains}", repr(CHAINS)), legation_port, env))
        http_port = free_port()
        procs.append(_start(HTTP_SERVER.replace("{chains}", repr(CHAINS)), http_port, env))
        xhttp_port = free_port()
        procs.append(_start(EXTPROC_HTTP_SERVER.replace("{chains}", repr(CHAINS)), xhttp_port, env))
        services = {
            "legation": procs[0].pid,
            "legation-http": procs[1].pid,
            "legation-extproc-http": procs[2].pid,
        }
        sdk_port = free_port()
        if sdk_env is not None:
            procs.append(_start(SDK_SERVER, sdk_port, sdk_env))
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
            _listener("plain", ports["plain"], [rt("stable")], None),
            _listener(
                "native",
                ports["native"],
                [{"match": native_match, "route": {"cluster": "canary"}}, rt("stable")],
                None,
            ),
            _listener(
                "legation",
                ports["legation"],
                [rt("canary", beta, route_chain, True), rt("stable", None, route_chain, True)],
                "legation",
            ),
        ]
        listeners.append(
            _listener(
                "legation-http",
                ports["legation-http"],
                [_fused_route("canary", beta), _fused_route("stable")],
                "legation-http",
            )
        )
        xhttp = [
            harness.route("/", c, None, headers=h, http_filter=EXTPROC_HTTP_FILTER)
            for c, h in (("canary", beta), ("stable", None))
        ]
        listeners.append(
            _listener(
                "legation-extproc-http",
                ports["legation-extproc-http"],
                xhttp,
                "legation-extproc-http",
            )
        )
        if sdk_env is not None:
            sdk_routes = [
                rt("canary", beta, route_chain, True),
                rt("stable", None, route_chain, True),
            ]
            listeners.append(_listener("sdk", ports["sdk"], sdk_routes, "sdk"))
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
            if name == "sdk" and sdk_env is None:
                print("sdk: skipped (envoy-extproc-sdk not importable; see module docstring)")
                continue
            _check(port, routes=name != "plain")
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
                f"{_pct(lat, 50):7.2f} {_pct(lat, 90):7.2f} {_pct(lat, 99):7.2f} "
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
