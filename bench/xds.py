"""The xDS control plane under load, state of the world beside delta, and beside a real Envoy.

    .venv/bin/python -m bench.xds [--quick] [--services 1000] [--clients 50] [--rounds 3]

For each protocol (SotW, then delta) one xDS server is spawned in a process of its own (debounce 0,
so ``set_snapshot`` publishes at once); the bench process runs the ADS clients
(:class:`legation.xds.client.AdsClient`, which subscribe, follow and ACK as Envoy does) in one
asyncio loop. Measured:

* the snapshot build: N services (a cluster, its ClusterLoadAssignment and a route each, one
  listener), encoded in the server process,
* initial sync: from ``set_snapshot`` until every client has ACKed every type, seen from the server
  (the moment its cache records the last ACK) and from the clients (the last response that
  completed a client's versions), with the bytes each client received,
* one endpoint change (one service moves to another port): the same times, and the bytes per client
  (SotW resends every ClusterLoadAssignment, delta sends the one that changed),
* the server's peak RSS (VmHWM of its process) after both,
* a real Envoy given the same snapshot over ADS, connected first (``warm``) and started after the
  snapshot was set (``cold``): its apply time until LIVE with every cluster active, beside the
  control plane's time to build and serve that config.

Bounded: about 50 s with the defaults (3 rounds), ~10 s with ``--quick`` (200 services, 10
clients, 2 rounds); every wait has a timeout.
Prints a table with ratios and writes ``bench/results/xds.json`` (``xds-quick.json`` for --quick).
"""

from __future__ import annotations

import os

# gRPC core logs an INFO line for every GOAWAY when a stream ends: noise here. It reads the
# setting when grpc is imported, so before the imports below (the server process inherits it).
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench._xds_envoy import envoy_apply
from bench._xds_server import ServerProcess
from legation.xds.client import AdsClient
from tests.conftest import free_port

RESULTS = Path(__file__).parent / "results"
GROUP = "bench"  # node cluster shared by the clients; their snapshot is set under this key


async def _connect(server: ServerProcess, nodes: list[str], delta: bool) -> list[AdsClient]:
    clients = [await AdsClient(server.target, n, cluster=GROUP, delta=delta).start() for n in nodes]
    deadline = time.monotonic() + 30
    while (await server.acall("connected", nodes=nodes))["connected"] < len(nodes):
        if time.monotonic() > deadline:
            raise TimeoutError("the ADS clients did not all connect in 30 s")
        await asyncio.sleep(0.05)
    return clients


async def _phase(
    server: ServerProcess,
    clients: list[AdsClient],
    snapshot: str,
    target: dict[str, str],
    before: dict[str, str],
) -> dict[str, Any]:
    """Set ``snapshot`` and wait until every client has ACKed ``target``; times and bytes."""
    cpu0 = time.process_time()
    answer = await server.acall(
        "set", name=snapshot, key=GROUP, nodes=[c.node.id for c in clients], timeout=60.0
    )
    clients_cpu = time.process_time() - cpu0
    if not answer["ok"]:
        raise TimeoutError(f"not ACKed in 60 s by {answer['missing']}")
    await asyncio.sleep(0.2)  # anything still on its way would be counted in the bytes
    t0 = answer["t0"]
    changed = [t for t, v in target.items() if before.get(t) != v]
    done, nbytes = [], []
    for c in clients:
        got = [r for r in c.received if r.at >= t0]
        nbytes.append(sum(r.nbytes for r in got))
        acked = {t.short: v for t, v in c.acked.items()}
        if any(acked.get(t) != v for t, v in target.items()):
            raise RuntimeError(f"{c.node.id} did not end at the snapshot's versions")
        done.append(
            max(
                max(r.at for r in got if r.type.short == t and r.version == target[t])
                for t in changed
            )
            - t0
        )
    return {
        "server_all_acked_s": answer["acked_at"] - t0,
        "clients_all_acked_s": max(done),
        "clients_median_acked_s": statistics.median(done),
        "bytes_per_client": statistics.mean(nbytes),
        "bytes_per_client_min_max": [min(nbytes), max(nbytes)],
        "server_push_bytes": answer["push_bytes"],
        "server_cpu_s": answer["cpu_s"],
        "type_acked_s": answer["type_acked_s"],
        "clients_cpu_s": clients_cpu,
        "types_changed": changed,
    }


async def _client_rounds(
    server: ServerProcess,
    args: argparse.Namespace,
    delta: bool,
    v1: dict[str, Any],
    v2: dict[str, Any],
) -> dict[str, list[Any]]:
    """Per round: new clients connect to nothing, then v1 is set, then v2 (one endpoint moved)."""
    out: dict[str, list[Any]] = {"initial": [], "endpoint_change": []}
    for r in range(args.rounds):
        print(
            f"  {'delta' if delta else 'sotw'} round {r + 1}/{args.rounds}: "
            f"{args.clients} ADS clients ...",
            flush=True,
        )
        await server.acall("clear", key=GROUP)
        nodes = [f"r{r}-client-{i:02d}" for i in range(args.clients)]
        clients = await _connect(server, nodes, delta)
        try:
            out["initial"].append(await _phase(server, clients, "v1", v1["versions"], {}))
            out["endpoint_change"].append(
                await _phase(server, clients, "v2", v2["versions"], v1["versions"])
            )
        finally:
            for c in clients:
                await c.stop()
    return out


def _median(runs: list[Any]) -> Any:
    """The median of every number across rounds (dicts are followed; anything else: round 1)."""
    first = runs[0]
    if isinstance(first, dict):
        return {k: _median([r[k] for r in runs]) for k in first}
    if isinstance(first, int | float) and not isinstance(first, bool):
        return statistics.median(runs)
    return first


def run_protocol(args: argparse.Namespace, delta: bool, workdir: Path) -> dict[str, Any]:
    name = "delta" if delta else "sotw"
    server = ServerProcess().start()
    try:
        idle = server.memory_mib()
        listen = free_port()  # only Envoy binds it
        builds = [
            server.call("build", name="v1", services=args.services, listen_port=listen)
            for _ in range(args.rounds)
        ]  # the same snapshot each time: median of N
        v1 = _median(builds)
        v2 = server.call(
            "build", name="v2", services=args.services, listen_port=listen, bump=args.services // 2
        )
        rounds = asyncio.run(_client_rounds(server, args, delta, v1, v2))
        mem = server.memory_mib()
        for r in range(args.rounds):
            print(f"  {name} round {r + 1}/{args.rounds}: real Envoy ...", flush=True)
            for how in ("warm", "cold"):
                rounds.setdefault(f"envoy_{how}", []).append(
                    envoy_apply(
                        server,
                        snapshot="v1",
                        services=args.services,
                        delta=delta,
                        cold=how == "cold",
                        node=f"envoy-{name}-{how}-{r}",
                        workdir=workdir,
                    )
                )
    finally:
        server.stop()
    rounds["build"] = builds
    out: dict[str, Any] = {"build": v1, "rounds": rounds}
    out.update({phase: _median(results) for phase, results in rounds.items()})
    out["server_rss_mib"] = {
        "idle": idle["VmRSS"],
        "after_clients": mem["VmRSS"],
        "peak_after_clients": mem["VmHWM"],
    }
    return out


def _ratio(a: float, b: float) -> str:
    if not (a and b):
        return "-"
    return f"{a / b:.2f}" if a / b >= 0.1 else f"1/{b / a:.0f}"


def _kb(n: float) -> str:
    return f"{n / 1024:.1f} KiB" if n >= 1024 else f"{n:.0f} B"


def _ms(s: float) -> str:
    return f"{s * 1000:.0f} ms"


def print_table(res: dict[str, Any]) -> None:
    s, d = res["sotw"], res["delta"]
    n, k = res["services"], res["clients"]
    rows: list[tuple[str, ...]] = []

    def row(label: str, a: float, b: float, fmt: Any) -> None:
        rows.append((label, fmt(a), fmt(b), _ratio(b, a)))

    load = ", ".join(f"{x:.2f}" for x in res["loadavg_before"])
    print(
        f"\nxDS control plane: {n} services, {k} ADS clients, median of {res['rounds']} rounds, "
        f"server in its own process, debounce 0\n(machine: {res['cpus']} CPUs, load average "
        f"before the run {load})"
    )
    row("snapshot build (same work in both)", s["build"]["build_s"], d["build"]["build_s"], _ms)
    for phase, title in (("initial", "initial sync"), ("endpoint_change", "1 endpoint change")):
        a, b = s[phase], d[phase]
        row(
            f"{title}: set -> all ACKed (server)",
            a["server_all_acked_s"],
            b["server_all_acked_s"],
            _ms,
        )
        row(
            f"{title}: set -> all ACKed (clients)",
            a["clients_all_acked_s"],
            b["clients_all_acked_s"],
            _ms,
        )
        row(f"{title}: bytes per client", a["bytes_per_client"], b["bytes_per_client"], _kb)
        row(f"{title}: server CPU", a["server_cpu_s"], b["server_cpu_s"], _ms)
        row(f"{title}: clients CPU (bench process)", a["clients_cpu_s"], b["clients_cpu_s"], _ms)
    row(
        "server RSS idle (before building)",
        s["server_rss_mib"]["idle"],
        d["server_rss_mib"]["idle"],
        lambda v: f"{v:.0f} MiB",
    )
    row(
        "server peak RSS (VmHWM)",
        s["server_rss_mib"]["peak_after_clients"],
        d["server_rss_mib"]["peak_after_clients"],
        lambda v: f"{v:.0f} MiB",
    )
    _print(("", "SotW", "delta", "delta/SotW"), rows)

    print(
        f"\nReal Envoy 1.40 (1 worker) applying the same {n}-service snapshot over ADS "
        f"(median of {res['rounds']})"
    )
    rows = []
    for proto in ("sotw", "delta"):
        r = res[proto]
        build = r["build"]["build_s"]
        for how in ("warm", "cold"):
            e = r[f"envoy_{how}"]
            cp = build + e["server_cpu_s"]
            rows.append(
                (
                    f"{proto} {how}",
                    _ms(build),
                    _ms(e["server_cpu_s"]),
                    _ms(cp),
                    _ms(e["apply_s"]),
                    _ratio(e["apply_s"], cp),
                    _ms(e["envoy_cpu_s"]),
                    _ms(e["type_acked_s"]["CDS"]),
                    _ms(e["server_acked_s"]),
                )
            )
    _print(
        (
            "",
            "CP build",
            "CP serve",
            "CP total",
            "Envoy apply",
            "Envoy/CP",
            "Envoy CPU",
            "CDS ACK",
            "last ACK",
        ),
        rows,
    )
    print(
        "  CP build: building the snapshot. CP serve: server CPU from set_snapshot until\n"
        "  Envoy's last ACK. Envoy apply (wall): warm = set_snapshot -> LIVE with all clusters\n"
        "  active, Envoy connected and waiting; cold = Envoy process start -> the same, the\n"
        "  snapshot set before. Envoy CPU: its CPU time meanwhile. CDS ACK, last ACK:\n"
        "  when the server recorded Envoy's ACK of the clusters, of the last type (same start)."
    )


def _print(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    width = max(len(r[0]) for r in [header, *rows])
    cols = [max(len(r[i]) for r in [header, *rows]) for i in range(1, len(header))]
    for r in [header, *rows]:
        print(
            "  "
            + r[0].ljust(width)
            + "".join("  " + c.rjust(w) for c, w in zip(r[1:], cols, strict=True))
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="200 services, 10 clients (~30 s)")
    parser.add_argument("--services", type=int, default=None)
    parser.add_argument("--clients", type=int, default=None)
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="repetitions, medians are printed (default 3, --quick 2)",
    )
    args = parser.parse_args()
    args.services = args.services or (200 if args.quick else 1000)
    args.clients = args.clients or (10 if args.quick else 50)
    args.rounds = args.rounds or (2 if args.quick else 3)
    started = time.monotonic()
    res: dict[str, Any] = {
        "services": args.services,
        "clients": args.clients,
        "rounds": args.rounds,
        "quick": args.quick,
        "cpus": os.cpu_count(),
        "loadavg_before": os.getloadavg(),
    }
    with tempfile.TemporaryDirectory(prefix="legation-bench-xds-") as tmp:
        for delta in (False, True):
            res["delta" if delta else "sotw"] = run_protocol(args, delta, Path(tmp))
    res["wall_s"] = time.monotonic() - started
    print_table(res)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / ("xds-quick.json" if args.quick else "xds.json")
    out.write_text(json.dumps(res, indent=2, sort_keys=True) + "\n")
    print(f"\n({res['wall_s']:.0f} s in all; results in {out.relative_to(Path.cwd())})")


if __name__ == "__main__":
    main()
