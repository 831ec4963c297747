"""The floor of each call-out: minimal grpc.aio servicers beside Legation's services, one run.

    .venv/bin/python -m bench.floor [--seconds 4] [--rounds 2] [--connections 16]
                                    [--at-once-rounds N]

One front Envoy (``--concurrency 1``) proxies every listener to a loopback upstream that is a
second Envoy answering ``direct_response`` (its own process and worker, so the upstream is never
the bottleneck). Listeners:

  plain          proxying only (the limit)
  authz-min      ext_authz -> a minimal grpc.aio Authorization servicer (always OK)
  authz-uv       the same minimal servicer, on uvloop
  authz-leg      ext_authz -> Legation's extauthz service, one check that always allows
  rl-min         ratelimit -> a minimal grpc.aio RateLimitService (always OK)
  rl-uv          the same, on uvloop
  rl-leg         ratelimit -> Legation's ratelimit service (memory backend, a limit never reached)
  proc-min       ext_proc (request headers only) -> a minimal grpc.aio processor
  proc-uv        the same, on uvloop
  proc-leg       ext_proc -> Legation's extproc service, a chain of one no-op filter

Every service runs in its own process. Legation's are started as ``legation serve`` starts
them: the service's ``start_server`` with the default Prometheus registry, a config file where
the CLI takes one, on the loop :mod:`legation._loop` picks (uvloop;
``LEGATION_EVENT_LOOP=asyncio`` measures them on asyncio's own loop). The minimal servicers
carry no metrics, no logging and default server options, on asyncio's loop (``-min``, the floor
issue #13 names) or on uvloop (``-uv``).

Two measurements:

* **One after the other** (``wrk -t1 -cN -dS`` per listener). Per row: rps, ratio to plain,
  Legation's ratio to each minimal servicer, and CPU per request of the service, the front Envoy
  and the upstream Envoy (from /proc, over the wrk window) so a row's bottleneck can be read off.
  Rounds repeat the whole sequence, each service's rows side by side, their order reversed every
  other round; the table shows the median and the spread, ``leg/min`` and ``leg/uv`` the median
  of the round-by-round ratios (each listed after the table). One round's ratio moves by
  +-0.1 on this 2-core machine.
* **At once** (``--at-once-rounds``, default ``--rounds``): Legation's service and one minimal
  servicer (and the minimal servicer on uvloop and on asyncio's loop) loaded together, each by
  its own ``wrk`` with half the connections, for ``--seconds``; which ``wrk`` starts first
  alternates. A ``wrk`` that reports socket errors or non-2xx answers fails the run. Both then
  see the same machine at the same moments, so what slows one slows the other and the ratio of
  their rates keeps only what differs between them: the spread of one round's ratio is
  +-0.01-0.03. With every process busy, each service gets its share of the CPU and serves in
  proportion to its CPU per call, so this ratio estimates the same thing as the
  one-after-the-other ``leg/min`` (the CPU ratio beside it says the same from /proc; both
  go through the one front Envoy, which in these runs has CPU to spare, ~70 %).

Any non-2xx answer is an error. About 20 s of set-up, rounds x 10 x seconds, then at-once
rounds x 9 x seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from legation.envoy_process import EnvoyProcess
from legation.extauthz.checks import ALLOW

REPO = Path(__file__).resolve().parents[1]
GROUPS = ("authz", "rl", "proc")
MINIMAL = ("min", "uv")  # the minimal servicer on asyncio's loop, on uvloop
SERVICES = tuple(f"{g}-{v}" for g in GROUPS for v in (*MINIMAL, "leg"))
SCENARIOS = ("plain", *SERVICES)
CHAIN = "floor"
LIMITS = """\
domain: floor
descriptors:
  - key: generic_key
    value: floor
    rate_limit: {unit: hour, requests_per_unit: 1000000000}
"""
_CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- the service processes (``--serve KIND``) -------------------------------------------------


class _AllowCheck:
    """Legation ext_authz check plugin that always allows (registered at run time)."""

    name = "allow"

    async def check(self, ctx: Any) -> Any:
        return ALLOW

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None


class _AllowFactory:
    name = "allow"

    def validate(self, raw: Mapping[str, Any]) -> dict[str, Any]:
        return dict(raw)

    def create(self, config: Any) -> _AllowCheck:
        return _AllowCheck()


class _NoOp:
    """Legation ext_proc filter that declares request headers and changes nothing."""

    name = "noop"
    # it never blocks: run on the loop like the built-ins (a plain hook without this runs on a
    # worker thread, ~80 us more per phase, so that a blocking filter cannot stall the service)
    inline = True

    def __init__(self) -> None:
        from legation.extproc.sdk import BodyMode, Phase

        self.phases = frozenset({Phase.REQUEST_HEADERS})
        self.body_mode = BodyMode.BUFFERED

    def on_request_headers(self, ex: Any) -> None:
        return None


class _NoOpFactory:
    name = "noop"

    def validate(self, raw: Mapping[str, Any]) -> dict[str, Any]:
        return dict(raw)

    def create(self, config: Any) -> _NoOp:
        return _NoOp()


def _register_plugins() -> None:
    from legation import plugins

    plugins.register("extauthz.check", _AllowFactory())
    plugins.register("extproc.filter", _NoOpFactory())


def _chains_doc() -> dict[str, Any]:
    return {"chains": {CHAIN: {"filters": [{"name": "noop"}]}}}


async def _serve(kind: str, workdir: Path) -> None:
    import grpc

    server: Any
    if kind in ("authz-min", "authz-uv"):
        from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc

        class Authz(external_auth_pb2_grpc.AuthorizationServicer):
            async def Check(self, request: Any, context: Any) -> Any:
                response = external_auth_pb2.CheckResponse()
                response.status.code = 0
                return response

        server = grpc.aio.server()
        external_auth_pb2_grpc.add_AuthorizationServicer_to_server(Authz(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
    elif kind in ("rl-min", "rl-uv"):
        from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc

        ok = rls_pb2.RateLimitResponse.OK

        class Rls(rls_pb2_grpc.RateLimitServiceServicer):
            async def ShouldRateLimit(self, request: Any, context: Any) -> Any:
                return rls_pb2.RateLimitResponse(overall_code=ok)

        server = grpc.aio.server()
        rls_pb2_grpc.add_RateLimitServiceServicer_to_server(Rls(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
    elif kind in ("proc-min", "proc-uv"):
        from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
        from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

        class Proc(pb_grpc.ExternalProcessorServicer):
            async def Process(self, request_iterator: Any, context: Any) -> Any:
                async for _ in request_iterator:
                    yield pb.ProcessingResponse(request_headers=pb.HeadersResponse())

        server = grpc.aio.server()
        pb_grpc.add_ExternalProcessorServicer_to_server(Proc(), server)  # type: ignore[arg-type]
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
    elif kind == "authz-leg":
        from legation.extauthz import service as authz

        _register_plugins()
        config = workdir / "authz.yaml"
        config.write_text(json.dumps({"checks": {"allow": {"type": "allow"}}}))
        server, port = await authz.start_server(authz.Settings(config_file=config))
    elif kind == "rl-leg":
        from legation.ratelimit import service as rl

        config = workdir / "limits.yaml"
        config.write_text(LIMITS)
        server, port = await rl.start_server(rl.Settings(config_files=(str(config),)))
    elif kind == "proc-leg":
        from legation.extproc import service as proc

        _register_plugins()
        config = workdir / "chains.yaml"
        config.write_text(json.dumps(_chains_doc()))
        server, port = await proc.start_server(proc.Settings(config_file=config))
    else:
        raise SystemExit(f"unknown service {kind!r}")
    print(f"ready {port}", flush=True)
    await server.wait_for_termination()


def serve(kind: str, workdir: Path) -> None:
    """Run service ``kind`` on its loop: Legation's on :mod:`legation._loop`'s (as ``legation
    serve`` runs it), a ``-uv`` minimal servicer on uvloop, a ``-min`` one on asyncio's."""
    import asyncio

    if kind.endswith("-leg"):
        from legation import _loop

        _loop.run(_serve(kind, workdir))
    elif kind.endswith("-uv"):
        import uvloop

        uvloop.run(_serve(kind, workdir))
    else:
        asyncio.run(_serve(kind, workdir))


# -- Envoy configs ----------------------------------------------------------------------------


def _router() -> dict[str, Any]:
    return {
        "name": "envoy.filters.http.router",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
        },
    }


def _listener(
    name: str, port: int, route: dict[str, Any], filters: list[dict[str, Any]]
) -> dict[str, Any]:
    return http_listener(name, port, [route], filters)


def http_listener(
    name: str, port: int, routes: list[dict[str, Any]], filters: list[dict[str, Any]]
) -> dict[str, Any]:
    """A loopback HTTP listener: ``routes`` on one virtual host, ``filters`` then the router."""
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager"
        ".v3.HttpConnectionManager",
        "stat_prefix": name.replace("-", "_"),
        "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": routes}]},
        "http_filters": [*filters, _router()],
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


def _plain(message: Any) -> dict[str, Any]:
    from google.protobuf.json_format import MessageToDict

    return json.loads(json.dumps(MessageToDict(message, preserving_proto_field_name=True)))


def upstream_bootstrap(port: int, admin: int) -> dict[str, Any]:
    route = {
        "match": {"prefix": "/"},
        "direct_response": {"status": 200, "body": {"inline_string": "ok"}},
    }
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {"listeners": [_listener("upstream", port, route, [])]},
    }


def front_bootstrap(
    ports: Mapping[str, int], services: Mapping[str, int], upstream: int, admin: int
) -> dict[str, Any]:
    from legation.extauthz import envoy_filter as authz_ef
    from legation.extproc import envoy_filter as proc_ef
    from legation.extproc.config import build_chains
    from legation.ratelimit import envoy_filter as rl_ef

    _register_plugins()
    chain = build_chains(_chains_doc()).chains[CHAIN]
    listeners = []
    clusters: list[dict[str, Any]] = [
        {
            "name": "upstream",
            "type": "STATIC",
            "connect_timeout": "1s",
            "load_assignment": {
                "cluster_name": "upstream",
                "endpoints": [
                    {
                        "lb_endpoints": [
                            {
                                "endpoint": {
                                    "address": {
                                        "socket_address": {
                                            "address": "127.0.0.1",
                                            "port_value": upstream,
                                        }
                                    }
                                }
                            }
                        ]
                    }
                ],
            },
        }
    ]
    for name in SCENARIOS:
        route: dict[str, Any] = {"match": {"prefix": "/"}, "route": {"cluster": "upstream"}}
        filters: list[dict[str, Any]] = []
        if name.startswith("authz"):
            filters.append(_plain(authz_ef.http_filter(name)))
            route["typed_per_filter_config"] = {
                authz_ef.FILTER_NAME: _plain(
                    authz_ef.per_route_any(policy="floor", checks=["allow"])
                )
            }
            clusters.append(_plain(authz_ef.grpc_cluster(name, [("127.0.0.1", services[name])])))
        elif name.startswith("rl"):
            filters.append(
                _plain(rl_ef.rate_limit_filter(domain="floor", cluster=name, timeout_ms=1000))
            )
            route["route"]["rate_limits"] = [
                _plain(r) for r in rl_ef.route_rate_limits([rl_ef.GenericKey("floor")])
            ]
            clusters.append(_plain(rl_ef.rate_limit_cluster(name, "127.0.0.1", services[name])))
        elif name.startswith("proc"):
            filters.append(_plain(proc_ef.http_filter(name)))
            route["typed_per_filter_config"] = {
                k: _plain(v) for k, v in proc_ef.typed_per_filter_config(chain).items()
            }
            clusters.append(_plain(proc_ef.grpc_cluster(name, "127.0.0.1", services[name])))
        listeners.append(_listener(name, ports[name], route, filters))
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {"listeners": listeners, "clusters": clusters},
    }


# -- measuring --------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """user + system CPU of a process (all threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def wrk(
    port: int, seconds: int, connections: int, threads: int, strict: bool = True
) -> tuple[float, str]:
    out = subprocess.run(
        ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", f"http://127.0.0.1:{port}/"],
        capture_output=True,
        text=True,
        timeout=seconds + 30,
    ).stdout
    return rate_of(out, f"port {port}", strict=strict), out


def rate_of(out: str, where: str, *, strict: bool = True) -> float:
    """The requests per second in wrk's output ``out``; raises naming ``where`` when there is
    none, or (``strict``) when wrk counted non-2xx answers."""
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if m is None or (non2xx and strict):
        raise RuntimeError(f"wrk on {where}: no rate or non-2xx answers:\n{out}")
    return float(m.group(1))


def wait_ok(port: int, deadline: float) -> None:
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as r:
                if r.status == 200 and r.read() == b"ok":
                    return
        except (OSError, urllib.error.URLError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"port {port} never answered 200 through Envoy")
        time.sleep(0.1)


def start_envoys(
    front_config: dict[str, Any],
    *,
    up_port: int,
    up_admin: int,
    admin: int,
    workdir: Path,
    prefix: str,
    envoys: list[EnvoyProcess],
    listeners: Iterable[int],
) -> tuple[EnvoyProcess, EnvoyProcess]:
    """The upstream Envoy (``direct_response`` on ``up_port``) and the front Envoy from
    ``front_config``, started side by side, both live and every front listener answering. Both
    are appended to ``envoys`` (the caller stops them). Returns (upstream, front)."""
    upstream = EnvoyProcess(
        upstream_bootstrap(up_port, up_admin),
        admin_port=up_admin,
        name=f"{prefix}-upstream",
        log_dir=workdir,
    ).start()
    envoys.append(upstream)
    front = EnvoyProcess(
        front_config, admin_port=admin, name=f"{prefix}-front", log_dir=workdir
    ).start()
    envoys.append(front)
    upstream.wait_live()
    front.wait_live()
    deadline = time.monotonic() + 20
    for port in listeners:
        wait_ok(port, deadline)
    return upstream, front


def start_ready(module: str, *argv: str) -> tuple[subprocess.Popen[str], int]:
    """``python -m module *argv`` from the repository, once it printed ``ready <port>``."""
    proc = subprocess.Popen(
        [sys.executable, "-m", module, *argv],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
        env=dict(os.environ, GRPC_VERBOSITY="ERROR"),
    )
    line = proc.stdout.readline() if proc.stdout else ""
    if not line.startswith("ready "):
        raise RuntimeError(f"{module} {' '.join(argv)} did not start")
    return proc, int(line.split()[1])


def median(rows: Mapping[str, list[dict[str, float]]], name: str, key: str) -> float:
    """The median of ``key`` over the rounds of row ``name`` (NaN when no round has it)."""
    vals = [r[key] for r in rows[name] if key in r]
    return statistics.median(vals) if vals else float("nan")


def start_service(kind: str, workdir: Path) -> subprocess.Popen[str]:
    workdir.mkdir()
    env = dict(os.environ)
    env.setdefault("GRPC_VERBOSITY", "ERROR")
    return subprocess.Popen(
        [sys.executable, "-m", "bench.floor", "--serve", kind, str(workdir)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        serve(sys.argv[2], Path(sys.argv[3]))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", help="comma-separated scenarios (plain is always measured)")
    ap.add_argument(
        "--at-once-rounds",
        type=int,
        help="rounds of each Legation service loaded together with each minimal servicer "
        "(default: --rounds; 0: none)",
    )
    ap.add_argument(
        "--profile",
        metavar="DIR",
        help="py-spy record --native each service under load (round 1; sampling "
        "stops the process, so profiled rates are not comparable)",
    )
    args = ap.parse_args()
    scenarios = (
        SCENARIOS
        if not args.only
        else tuple(s for s in SCENARIOS if s == "plain" or s in args.only.split(","))
    )

    from tests.conftest import free_port

    workdir = Path(tempfile.mkdtemp(prefix="bench-floor-"))
    procs: dict[str, subprocess.Popen[str]] = {}
    envoys: list[EnvoyProcess] = []
    try:
        for kind in SERVICES:
            procs[kind] = start_service(kind, workdir / kind)
        services: dict[str, int] = {}
        for kind, proc in procs.items():
            line = proc.stdout.readline() if proc.stdout else ""
            if not line.startswith("ready "):
                raise RuntimeError(f"service {kind} did not start")
            services[kind] = int(line.split()[1])
        up_port, up_admin, admin = free_port(), free_port(), free_port()
        ports = {name: free_port() for name in SCENARIOS}
        upstream, front = start_envoys(
            front_bootstrap(ports, services, up_port, admin),
            up_port=up_port,
            up_admin=up_admin,
            admin=admin,
            workdir=workdir,
            prefix="floor",
            envoys=envoys,
            listeners=[ports[name] for name in scenarios],
        )
        ports["direct"] = up_port  # calibration: the upstream Envoy alone, no proxying
        assert front.proc is not None and upstream.proc is not None
        print(
            f"wrk -t{args.threads} -c{args.connections} -d{args.seconds}s, front Envoy "
            f"--concurrency 1, {args.rounds} round(s); load average "
            f"{os.getloadavg()[0]:.2f} before",
            flush=True,
        )
        order = ("direct", *scenarios)
        rows: dict[str, list[dict[str, float]]] = {n: [] for n in order}
        for r in range(args.rounds):
            for name in round_order(order, r):
                pids = {"front": front.proc.pid, "upstream": upstream.proc.pid}
                if name in procs:
                    pids["service"] = procs[name].pid
                before = {k: cpu_seconds(p) for k, p in pids.items()}
                spy = None
                if args.profile and r == 0 and name in procs:
                    spy = subprocess.Popen(
                        [
                            str(Path(sys.executable).with_name("py-spy")),
                            "record",
                            "--native",
                            "-r",
                            "200",
                            "-d",
                            str(args.seconds),
                            "-f",
                            "raw",
                            "-o",
                            str(Path(args.profile) / f"{name}.txt"),
                            "-p",
                            str(procs[name].pid),
                        ],
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                t0 = time.monotonic()
                rps, _ = wrk(
                    ports[name], args.seconds, args.connections, args.threads, strict=spy is None
                )  # a sampled ext_proc may miss its timeout
                wall = time.monotonic() - t0
                if spy is not None:
                    spy.wait(30)
                n = rps * args.seconds
                row = {"rps": rps}
                for k, p in pids.items():
                    used = cpu_seconds(p) - before[k]
                    row[f"{k}_us"] = used / n * 1e6
                    row[f"{k}_cpu"] = used / wall
                rows[name].append(row)
                print(f"  round {r + 1} {name:10s} {rps:8.0f} rps", flush=True)
        print_table(rows, args.rounds)
        at_once_rounds = args.rounds if args.at_once_rounds is None else args.at_once_rounds
        pairs = [  # Legation's service against each minimal one; the loops against each other
            (a, b)
            for g in GROUPS
            for a, b in ((f"{g}-leg", f"{g}-min"), (f"{g}-leg", f"{g}-uv"), (f"{g}-uv", f"{g}-min"))
            if a in scenarios and b in scenarios
        ]
        if at_once_rounds and pairs:
            together = {
                pair: at_once(
                    {k: ports[k] for k in pair},
                    {k: procs[k].pid for k in pair},
                    rounds=at_once_rounds,
                    seconds=args.seconds,
                    connections=args.connections,
                    threads=args.threads,
                )
                for pair in pairs
            }
            print_at_once(together, args.connections)
        # the ratelimit filter fails open: a call that errs or times out still answers 200
        failed = {
            k: v
            for k, v in front.stats(
                r"ratelimit\.(error|failure_mode_allowed)|ext_authz\.(error|failure_mode_allowed)"
                r"|ext_proc\..*(error|timeout|failed)|upstream_rq_timeout|upstream_rq_5xx"
            ).items()
            if v and not k.startswith("cluster.upstream.")
        }
        print(
            "Envoy saw no call-out errors or timeouts"
            if not failed
            else f"call-out errors/timeouts (answered 200 all the same where fail-open): {failed}"
        )
    finally:
        for e in envoys:
            e.stop()
        for p in procs.values():
            p.kill()
            p.wait()


def round_order(order: Iterable[str], r: int) -> list[str]:
    """The rows of round ``r``: ``order``, each service's rows (its minimal servicers and
    Legation's) side by side, in reverse order every other round (a machine slowing down or
    speeding up over a group then favours none of its rows)."""
    out = list(order)
    if r % 2:
        for g in GROUPS:
            at = [i for i, name in enumerate(out) if name.split("-")[0] == g]
            for i, name in zip(at, reversed([out[i] for i in at]), strict=True):
                out[i] = name
    return out


def paired_ratios(rows: Mapping[str, list[dict[str, float]]], name: str, base: str) -> list[float]:
    """Row ``name``'s rps over row ``base``'s, round by round (measured side by side)."""
    return [
        leg["rps"] / low["rps"]
        for leg, low in zip(rows.get(name, []), rows.get(base, []), strict=False)
        if low["rps"]
    ]


def _bases(name: str) -> list[str]:
    """The minimal servicers a Legation row is compared with (none for other rows)."""
    group, _, variant = name.partition("-")
    return [f"{group}-{v}" for v in MINIMAL] if variant == "leg" else []


def print_table(rows: Mapping[str, list[dict[str, float]]], rounds: int) -> None:
    def med(name: str, key: str) -> float:
        return median(rows, name, key)

    base = med("plain", "rps")
    print(
        f"\n{'path':11s}{'rps':>8s}{'spread':>14s}{'/plain':>8s}{'leg/min':>8s}{'leg/uv':>8s}"
        f"{'svc us/req':>11s}{'svc cpu':>8s}{'front us':>9s}{'front cpu':>10s}{'up us':>7s}"
    )
    ratios = {
        (name, other): paired_ratios(rows, name, other) for name in rows for other in _bases(name)
    }
    for name in rows:
        rps = [r["rps"] for r in rows[name]]
        spread = f"{min(rps):.0f}-{max(rps):.0f}" if rounds > 1 else ""
        versus = ""
        for other in _bases(name) or [None, None]:
            pairs = ratios[name, other] if other else []
            versus += f"{statistics.median(pairs):8.2f}" if pairs else f"{'':8s}"
        svc = (
            f"{med(name, 'service_us'):11.0f}{med(name, 'service_cpu'):8.0%}"
            if name not in ("plain", "direct")
            else f"{'':11s}{'':8s}"
        )
        front = (
            f"{med(name, 'front_us'):9.0f}{med(name, 'front_cpu'):10.0%}"
            if name != "direct"
            else f"{'':9s}{'':10s}"
        )
        print(
            f"{name:11s}{med(name, 'rps'):8.0f}{spread:>14s}{med(name, 'rps') / base:8.2f}"
            f"{versus}{svc}{front}"
            f"{med(name, 'upstream_us'):7.0f}"
        )
    for (name, other), pairs in ratios.items():
        if pairs:
            each = " ".join(f"{x:.2f}" for x in pairs)
            print(f"{name} / {other}, round by round: {each}")
    if os.environ.get("BENCH_JSON"):
        print(json.dumps(rows))


def at_once(
    ports: Mapping[str, int],
    pids: Mapping[str, int],
    *,
    rounds: int,
    seconds: int,
    connections: int,
    threads: int = 1,
) -> list[dict[str, float]]:
    """Load the two services of ``ports`` together, each through its own listener by its own
    ``wrk`` with half of ``connections``, ``rounds`` times for ``seconds``; the ``wrk`` of the
    first starts first in even rounds, of the second in odd ones. Per round: the first's rps
    over the second's (``rps``) and the second's service CPU per request over the first's
    (``cpu``: above 1 when the first costs less per call)."""
    a, b = ports
    half = max(1, connections // 2)
    out = []
    for r in range(rounds):
        order = (a, b) if r % 2 == 0 else (b, a)
        before = {k: cpu_seconds(pids[k]) for k in order}
        runs: dict[str, subprocess.Popen[str]] = {}
        rps: dict[str, float] = {}
        try:
            for k in order:
                url = f"http://127.0.0.1:{ports[k]}/"
                runs[k] = subprocess.Popen(
                    ["wrk", f"-t{threads}", f"-c{half}", f"-d{seconds}s", url],
                    stdout=subprocess.PIPE,
                    text=True,
                )
            for k, run in runs.items():
                text, _ = run.communicate(timeout=seconds + 30)
                rps[k] = rate_of(text, k)
                if "Socket errors" in text or not rps[k]:
                    raise RuntimeError(f"wrk on {k}: socket errors or no answers:\n{text}")
        finally:  # a failed or stuck run: the other wrk does not outlive it
            for run in runs.values():
                if run.poll() is None:
                    run.kill()
                run.wait()
        us = {k: (cpu_seconds(pids[k]) - before[k]) / (rps[k] * seconds) for k in order}
        out.append({"rps": rps[a] / rps[b], "cpu": us[b] / us[a]})
        print(f"  at once {r + 1} {a} / {b}: {rps[a] / rps[b]:.3f}", flush=True)
    return out


def print_at_once(
    together: Mapping[tuple[str, str], list[dict[str, float]]], connections: int
) -> None:
    print(
        f"\nat once (each wrk -c{max(1, connections // 2)}): the first service / the second, "
        "loaded together"
    )
    print(f"{'pair':22s}{'rps ratio':>10s}{'spread':>14s}{'cpu ratio':>10s}")
    for (a, b), runs in together.items():
        rps = [x["rps"] for x in runs]
        cpu = [x["cpu"] for x in runs]
        print(
            f"{a + ' / ' + b:22s}{statistics.median(rps):10.3f}"
            f"{f'{min(rps):.3f}-{max(rps):.3f}':>14s}{statistics.median(cpu):10.3f}"
        )
    print("(cpu ratio: the second's CPU per call over the first's: above 1, the first costs less)")


if __name__ == "__main__":
    main()
