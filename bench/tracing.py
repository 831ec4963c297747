"""Tracing on vs. off through Envoy, and what Legation's spans cost, side by side in one run.

    .venv/bin/python -m bench.tracing [--seconds 4] [--rounds 3] [--connections 16]

One front Envoy (``--concurrency 1``) proxies every listener to a loopback upstream that is a
second Envoy answering ``direct_response``. Rows, measured one after the other with wrk, rounds
interleaved:

  plain            no tracer (the limit)
  traced-0         the OpenTelemetry tracer the control plane configures
                   (``legation.translate._tracing.otel_tracing``), sampling 0 %: configured,
                   nothing sampled
  traced-1         sampling 1 % (a production rate)
  traced-100       sampling 100 %: every request's span exported to Legation's embedded
                   receiver (its own process; its CPU per span is shown)
  authz            ext_authz -> Legation's extauthz service (one check that always allows), no
                   tracer, the service's spans off
  authz-unsampled  the tracer at 0 % and the service's spans on (a second extauthz process
                   exporting to the receiver): Envoy sends ``traceparent`` with the sampled flag
                   off, the service parses it and makes no span (the cost when nothing is traced)
  authz-traced     the tracer at 100 %, the same service: a span per check through the SDK

Per row: rps, ratio to its base (plain for the traced rows, authz for the authz rows), CPU per
request of the front Envoy and of the Legation process the row calls (the extauthz service or,
for traced-100, the receiver), from /proc over the wrk window.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bench.floor import (
    _listener,
    _plain,
    _register_plugins,
    cpu_seconds,
    median,
    start_envoys,
    start_ready,
    wrk,
)

ROWS = ("plain", "traced-0", "traced-1", "traced-100", "authz", "authz-unsampled", "authz-traced")
SAMPLING = {
    "traced-0": 0.0,
    "traced-1": 1.0,
    "traced-100": 100.0,
    "authz-unsampled": 0.0,
    "authz-traced": 100.0,
}
BASE = {"traced-0": "plain", "traced-1": "plain", "traced-100": "plain"}
SERVES = {"traced-100": "receiver", "authz": "authz-off", "authz-unsampled": "authz-on"}
SERVES["authz-traced"] = "authz-on"


# -- the Legation processes (``--serve KIND ARG``) --------------------------------------------


async def _serve(kind: str, arg: str) -> None:
    if kind == "receiver":
        from legation.tracing.receiver import TraceReceiver
        from legation.tracing.store import TraceStore

        receiver = await TraceReceiver(TraceStore(max_traces=1000, max_spans=20_000)).start()
        print(f"ready {receiver.port}", flush=True)
        await asyncio.Event().wait()
        return
    from legation.config.tracing import Tracing
    from legation.extauthz import service as authz
    from legation.tracing import spans

    _register_plugins()
    workdir = Path(tempfile.mkdtemp(prefix="bench-tracing-authz-"))
    config = workdir / "authz.yaml"
    config.write_text('{"checks": {"allow": {"type": "allow"}}}')
    if kind == "authz-on":
        spans.configure(Tracing(collector=f"127.0.0.1:{arg}"))
    server, port = await authz.start_server(authz.Settings(config_file=config))
    print(f"ready {port}", flush=True)
    await server.wait_for_termination()


def start(kind: str, arg: str) -> tuple[subprocess.Popen[str], int]:
    return start_ready("bench.tracing", "--serve", kind, arg)


# -- the front Envoy --------------------------------------------------------------------------


def front_bootstrap(
    ports: Mapping[str, int], served: Mapping[str, int], upstream: int, admin: int
) -> dict[str, Any]:
    from legation.envoy_grpc import grpc_cluster
    from legation.extauthz import envoy_filter as authz_ef
    from legation.translate._tracing import TRACING_CLUSTER, otel_tracing
    from tests.envoy_stack import static_cluster

    clusters = [
        static_cluster("upstream", upstream),
        _plain(grpc_cluster(TRACING_CLUSTER, [("127.0.0.1", served["receiver"])])),
    ]
    for kind in ("authz-off", "authz-on"):
        clusters.append(_plain(authz_ef.grpc_cluster(kind, [("127.0.0.1", served[kind])])))
    listeners = []
    for name in ROWS:
        route: dict[str, Any] = {"match": {"prefix": "/"}, "route": {"cluster": "upstream"}}
        filters: list[dict[str, Any]] = []
        if name.startswith("authz"):
            cluster = SERVES[name]
            filters.append(_plain(authz_ef.http_filter(cluster)))
            route["typed_per_filter_config"] = {
                authz_ef.FILTER_NAME: _plain(authz_ef.per_route_any(policy="b", checks=["allow"]))
            }
        listener = _listener(name, ports[name], route, filters)
        if name in SAMPLING:
            hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
            hcm["tracing"] = _plain(otel_tracing(SAMPLING[name], service_name="front"))
        listeners.append(listener)
    return {
        "node": {"id": "front", "cluster": "bench"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {"listeners": listeners, "clusters": clusters},
    }


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        asyncio.run(_serve(sys.argv[2], sys.argv[3]))
        return
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--seconds", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--connections", type=int, default=16)
    args = ap.parse_args()

    from legation.envoy_process import EnvoyProcess
    from tests.conftest import free_port

    workdir = Path(tempfile.mkdtemp(prefix="bench-tracing-"))
    procs: dict[str, subprocess.Popen[str]] = {}
    served: dict[str, int] = {}
    envoys: list[EnvoyProcess] = []
    try:
        procs["receiver"], served["receiver"] = start("receiver", "-")
        procs["authz-off"], served["authz-off"] = start("authz-off", "-")
        procs["authz-on"], served["authz-on"] = start("authz-on", str(served["receiver"]))
        up_port, up_admin, admin = free_port(), free_port(), free_port()
        ports = {name: free_port() for name in ROWS}
        _, front = start_envoys(
            front_bootstrap(ports, served, up_port, admin),
            up_port=up_port,
            up_admin=up_admin,
            admin=admin,
            workdir=workdir,
            prefix="tracing",
            envoys=envoys,
            listeners=ports.values(),
        )
        assert front.proc is not None
        print(
            f"wrk -t1 -c{args.connections} -d{args.seconds}s, front Envoy --concurrency 1, "
            f"{args.rounds} round(s); load average {os.getloadavg()[0]:.2f} before",
            flush=True,
        )
        rows: dict[str, list[dict[str, float]]] = {n: [] for n in ROWS}
        for r in range(args.rounds):
            for name in ROWS:
                pids = {"front": front.proc.pid}
                if name in SERVES:
                    pids["legation"] = procs[SERVES[name]].pid
                before = {k: cpu_seconds(p) for k, p in pids.items()}
                t0 = time.monotonic()
                # a call-out under this machine's load may miss Envoy's 200 ms ext_authz timeout
                rps, out = wrk(ports[name], args.seconds, args.connections, 1, strict=False)
                bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
                time.sleep(1.2 if name.endswith("100") or name.endswith("traced") else 0)
                wall = time.monotonic() - t0
                n = rps * args.seconds
                row = {"rps": rps, "non2xx": float(bad.group(1)) if bad else 0.0}
                for k, p in pids.items():
                    used = cpu_seconds(p) - before[k]
                    row[f"{k}_us"] = used / n * 1e6
                    row[f"{k}_cpu"] = used / wall
                rows[name].append(row)
                print(f"  round {r + 1} {name:16s} {rps:8.0f} rps", flush=True)
        print_table(rows)
        sent = front.stats(r"tracing\.opentelemetry\.spans_(sent|dropped)")
        print(f"Envoy's OpenTelemetry tracer counters: {sent}")
        micro(served["receiver"])
    finally:
        for e in envoys:
            e.stop()
        for proc in procs.values():
            proc.kill()
            proc.wait()


def micro(collector: int, n: int = 20_000) -> None:
    """What a service's handler pays per call in this process (no Envoy, no gRPC): the test
    with spans off, the parse of an unsampled ``traceparent``, a sampled call's SDK span (made
    and queued; exported on the batch processor's thread)."""
    from legation.config.tracing import Tracing
    from legation.tracing import spans
    from legation.tracing.spans import CallTracer

    tracer = CallTracer("bench")
    trace = "4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7"
    unsampled = [("user-agent", "grpc"), ("traceparent", f"00-{trace}-00")]
    sampled = [("user-agent", "grpc"), ("traceparent", f"00-{trace}-01")]

    def per_call(fn: Any) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - t0) / n * 1e6

    spans.configure(None)
    off = per_call(lambda: tracer.parent_in(sampled) if tracer.on else None)
    spans.configure(Tracing(collector=f"127.0.0.1:{collector}"))
    skip = per_call(lambda: tracer.parent_in(unsampled) if tracer.on else None)
    attrs = {"legation.decision": "allow", "legation.policy": "p", "legation.checks": "allow"}

    def one() -> None:
        parent = tracer.parent_in(sampled)
        assert parent is not None
        now = time.time_ns()
        tracer.record("bench", parent, start_ns=now - 1000, end_ns=now, attributes=attrs)

    made = per_call(one)
    spans.configure(None)
    print(
        f"per call in the handler ({n:,} calls): spans off {off:.2f} us, on but unsampled "
        f"{skip:.2f} us, sampled {made:.1f} us (SDK span made and queued)"
    )


def print_table(rows: Mapping[str, list[dict[str, float]]]) -> None:
    def med(name: str, key: str) -> float:
        return median(rows, name, key)

    print(
        f"\n{'row':17s}{'rps':>8s}{'spread':>14s}{'/base':>7s}{'envoy us/req':>13s}"
        f"{'legation us/req':>16s}{'non-2xx':>9s}"
    )
    for name in rows:
        rps = [r["rps"] for r in rows[name]]
        base = med(BASE.get(name, "authz" if name.startswith("authz") else "plain"), "rps")
        dash = "-"
        leg = (
            f"{med(name, 'legation_us'):16.1f}"
            if "legation_us" in rows[name][0]
            else f"{dash:>16s}"
        )
        print(
            f"{name:17s}{med(name, 'rps'):8.0f}{min(rps):>8.0f}-{max(rps):<5.0f}"
            f"{med(name, 'rps') / base:7.2f}{med(name, 'front_us'):13.1f}{leg}"
            f"{sum(r['non2xx'] for r in rows[name]):9.0f}"
        )
    span_cost = med("authz-traced", "legation_us") - med("authz-unsampled", "legation_us")
    off_cost = med("authz-unsampled", "legation_us") - med("authz", "legation_us")
    print(
        f"\nLegation's extauthz service: {off_cost:+.1f} us CPU per check with spans on but the "
        f"request unsampled, {span_cost:+.1f} us more per sampled check (the SDK span and its "
        f"export); Envoy's tracer at 100 %: "
        f"{med('traced-100', 'front_us') - med('plain', 'front_us'):+.1f} us per request"
    )


if __name__ == "__main__":
    main()
