"""bench/extproc.py's services: the chains, each setup's service process, envoy-extproc-sdk.

Each service runs in a process of its own (``python -c`` one of the scripts below, port as its
argument, ``ready`` on stdout once it listens). envoy-extproc-sdk is installed once into
``.legation/bench/extproc-sdk`` (see bench/extproc.py's docstring).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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


def start(code: str, port: int, env: dict[str, str]) -> subprocess.Popen[str]:
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


def install_sdk() -> str | None:
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


def sdk_env() -> dict[str, str] | None:
    # ddtrace is imported by the SDK; no agent runs here, so tracing and telemetry are off.
    env = dict(
        os.environ,
        DD_TRACE_ENABLED="false",
        DD_INSTRUMENTATION_TELEMETRY_ENABLED="false",
        DD_REMOTE_CONFIGURATION_ENABLED="false",
    )
    extra = os.environ.get("LEGATION_EXTPROC_SDK_PATH") or install_sdk()
    if extra:
        env["PYTHONPATH"] = extra + os.pathsep + env.get("PYTHONPATH", "")
    shim = SDK_SERVER.split("import grpc\n", 1)[0]
    probe = subprocess.run(
        [sys.executable, "-c", shim + "import envoy_extproc_sdk\n"], env=env, capture_output=True
    )
    return env if probe.returncode == 0 else None
