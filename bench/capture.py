"""App -> sidecar -> sidecar -> app on one host: explicit ports vs iptables capture in pods.

    .venv/bin/python -m bench.capture [--seconds 4] [--rounds 3] [--connections 16] [--rate 1000]

Two stacks of the same shape run side by side: the client (wrk / h2load, standing in for app A)
-> sidecar A (Envoy, outbound) -> sidecar B (Envoy, inbound) -> app B (an Envoy answering
``direct_response``), every Envoy ``--concurrency 1``, plain HTTP/1.1.

* ``explicit`` (today): all on 127.0.0.1, the client sends to sidecar A's port
  (:func:`bench.ebpf.start_stack`);
* ``iptables``: two pods made by :mod:`legation.capture` (namespaces on a bridge, the capture
  rules ``legation up --capture`` installs). The client in pod A calls a service address on port
  9080 as an app that knows no sidecar; pod A's OUTPUT rules redirect it to sidecar A (original
  destination listener), which calls pod B's app port; pod B's PREROUTING rules redirect that to
  sidecar B, which calls app B on pod B's loopback. The sidecars run under the proxy group.

So the iptables stack pays what a pod pays: two REDIRECTs with conntrack, and a veth pair and a
bridge between the pods where the explicit stack stays on loopback. With the eBPF splice
(:mod:`legation.capture.ebpf`, when this machine has what ``--ebpf`` needs) two more stacks:

* ``ebpf``: ``explicit`` with every process, the client included, in the splice's cgroup: all
  three loopback hops spliced;
* ``ipt+ebpf``: ``iptables`` (two more pods) in the splice's cgroup with connect-time redirection,
  as ``legation up --capture --ebpf`` runs: the client's connect goes straight to sidecar A
  (which reads the original destination from the getsockopt program), sidecar A's to pod B's
  inbound port instead of through its REDIRECT; no NAT left, all three hops spliced (sidecar A
  -> sidecar B across the two namespaces).

Per round and stack: ``wrk -t1 -cN`` (requests/s), then ``h2load --h1`` at a fixed rate (p50/p99
in ms), and CPU per request of the three Envoys and of the client. Medians over the rounds; each
ratio is the median of the per-round ratios; the eBPF gain is also shown the way merbridge reports
it (each eBPF stack against the same path without it). Needs root; everything it made is removed
at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.ebpf import _client_cpu, _cluster, sidecar_bootstrap, start_stack
from bench.floor import cpu_seconds, upstream_bootstrap
from legation.capture import netns
from legation.capture.ebpf import Sockmap, missing_features
from legation.capture.rules import pod_rules
from legation.config.capture import Capture
from legation.envoy_process import EnvoyProcess
from legation.translate._capture import ORIGINAL_DST_FILTER

REPO = Path(__file__).resolve().parents[1]
STACKS = ("explicit", "iptables", "ebpf", "ipt+ebpf")
GAINS = (("ebpf", "explicit"), ("ipt+ebpf", "iptables"))  # (with the splice, the same without)
RANGE = "10.214.0.0/24"
SERVICE_PORT = 9080
Join = Callable[[], None] | None  # the client's preexec_fn (into the splice's cgroup)
Stack = tuple[list[str], str, list[EnvoyProcess], Join]  # client prefix, URL, the Envoys, its join


def _admin_on(config: dict[str, Any], host: str) -> dict[str, Any]:
    config["admin"]["address"]["socket_address"]["address"] = host
    return config


def _start(envoys: list[EnvoyProcess], name: str, config: dict[str, Any], admin: int,
           workdir: Path, **where: Any) -> EnvoyProcess:  # fmt: skip
    envoy = EnvoyProcess(config, admin_port=admin, name=name, log_dir=workdir, **where).start()
    envoys.append(envoy)
    return envoy


def start_explicit(
    workdir: Path, envoys: list[EnvoyProcess], network: netns.Network, splice: Sockmap | None
) -> Stack:
    join = splice.preexec() if splice is not None else None
    label = "ebpf" if splice is not None else "explicit"
    port, mine = start_stack(label, workdir, envoys, join)
    return [], f"http://127.0.0.1:{port}/", mine, join


def start_iptables(
    workdir: Path, envoys: list[EnvoyProcess], network: netns.Network, splice: Sockmap | None
) -> Stack:
    from tests.conftest import distinct_ports

    cap = network.capture
    p = distinct_ports("app", "app_admin", "b_in", "b_out", "b_admin", "a_out", "a_admin", "a_in")
    label, pair = ("ipt-ebpf", "cd") if splice is not None else ("iptables", "ab")
    a, b = network.pod(f"bench-{pair[0]}"), network.pod(f"bench-{pair[1]}")
    join = splice.preexec() if splice is not None else None
    network.add_pod(a, hosts="127.0.0.1 localhost\n", rules=pod_rules(
        cap, pod_ip=a.ip, app_port=p["a_in"], inbound_port=p["a_in"], outbound_port=p["a_out"],
        admin_port=p["a_admin"]))  # fmt: skip
    network.add_pod(b, hosts="127.0.0.1 localhost\n", rules=pod_rules(
        cap, pod_ip=b.ip, app_port=p["app"], inbound_port=p["b_in"], outbound_port=p["b_out"],
        admin_port=p["b_admin"]))  # fmt: skip
    proxy = {"gid": cap.proxy_gid, "join": join}
    app = _admin_on(upstream_bootstrap(p["app"], p["app_admin"]), b.ip)
    inbound = _admin_on(sidecar_bootstrap("inbound", p["b_in"], p["app"], p["b_admin"]), b.ip)
    inbound["static_resources"]["listeners"][0]["address"]["socket_address"]["address"] = (
        "0.0.0.0"  # redirected connections arrive at the pod's address
    )
    outbound = _admin_on(sidecar_bootstrap("outbound", p["a_out"], p["app"], p["a_admin"]), a.ip)
    listener = outbound["static_resources"]["listeners"][0]
    listener["listener_filters"] = [
        {
            "name": ORIGINAL_DST_FILTER,
            "typed_config": {
                "@type": "type.googleapis.com/"
                "envoy.extensions.filters.listener.original_dst.v3.OriginalDst"
            },
        }
    ]
    next_hop = _cluster("next", p["app"])  # pod B's app port: its rules take it to sidecar B
    next_hop["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"][
        "socket_address"
    ]["address"] = b.ip
    outbound["static_resources"]["clusters"] = [next_hop]
    mine = [
        _start(envoys, f"{label}-app", app, p["app_admin"], workdir, admin_host=b.ip,
               netns=b.netns, join=join),
        _start(envoys, f"{label}-sidecar-b", inbound, p["b_admin"], workdir, admin_host=b.ip,
               netns=b.netns, **proxy),
        _start(envoys, f"{label}-sidecar-a", outbound, p["a_admin"], workdir, admin_host=a.ip,
               netns=a.netns, **proxy),
    ]  # fmt: skip
    for envoy in mine:
        envoy.wait_live()
    url = f"http://{cap.service_ip('app')}:{SERVICE_PORT}/"
    if splice is not None:  # as legation up --capture --ebpf: pod A's connects to the service
        splice.redirect(
            {a.netns: p["a_out"], b.netns: p["b_out"]}, cap.proxy_gid,
            [(cap.service_ip("app"), SERVICE_PORT)], [(b.ip, p["app"], p["b_in"])],
        )  # fmt: skip
    _wait_ok(a.exec_argv([]), url)
    return a.exec_argv([]), url, mine, join


_START: dict[str, tuple[Callable[..., Stack], bool]] = {  # how, and with the splice
    "explicit": (start_explicit, False),
    "iptables": (start_iptables, False),
    "ebpf": (start_explicit, True),
    "ipt+ebpf": (start_iptables, True),
}


def _run(argv: list[str], timeout: float, join: Join = None) -> str:
    import subprocess

    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, check=False, preexec_fn=join
    )
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr or done.stdout}")
    return done.stdout


def _wait_ok(prefix: list[str], url: str) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            if "200" in _run([*prefix, "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                              url], 10):  # fmt: skip
                return
        except RuntimeError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} does not answer 200")


def measure(stack: Stack, args: argparse.Namespace, tmp: Path) -> dict[str, float]:
    import re

    prefix, url, envoys, join = stack
    pids = [e.proc.pid for e in envoys if e.proc is not None]
    envoy_cpu, client_cpu = sum(cpu_seconds(p) for p in pids), _client_cpu()
    out = _run([*prefix, "wrk", "-t1", f"-c{args.connections}", f"-d{args.seconds}s", url],
               args.seconds + 30, join)  # fmt: skip
    envoy_cpu = sum(cpu_seconds(p) for p in pids) - envoy_cpu
    client_cpu = _client_cpu() - client_cpu
    rate, total = re.search(r"Requests/sec:\s+([\d.]+)", out), re.search(r"(\d+) requests in", out)
    if rate is None or total is None or "Non-2xx" in out or "Socket errors" in out:
        raise RuntimeError(f"wrk {url}: no rate, errors or non-2xx answers:\n{out}")
    row = {"rps": float(rate.group(1)), "requests": float(total.group(1))}
    row["envoy_us"] = envoy_cpu / row["requests"] * 1e6
    row["client_us"] = client_cpu / row["requests"] * 1e6
    log = tmp / "h2load.log"
    log.unlink(missing_ok=True)
    _run([*prefix, "h2load", "--h1", "-c4", f"--rps={args.rate / 4:g}", f"-D{args.seconds}",
          f"--log-file={log}", url], args.seconds + 30, join)  # fmt: skip
    rows = [line.split("\t") for line in log.read_text().splitlines() if line.strip()]
    ok = sorted(int(r[2]) / 1000 for r in rows if r[1] == "200")  # us -> ms
    if len(ok) != len(rows) or not ok:
        raise RuntimeError(f"fixed-rate run on {url}: {len(rows) - len(ok)} not 200")
    row.update({f"p{q}": ok[min(len(ok) - 1, int(len(ok) * q / 100))] for q in (50, 99)})
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--rate", type=int, default=1000, help="requests/s for the latency run")
    args = ap.parse_args()
    netns.require()
    workdir = Path(tempfile.mkdtemp(prefix="bench-capture-"))
    network = netns.Network(Capture.model_validate({"cidr": RANGE}))
    envoys: list[EnvoyProcess] = []
    lacking = missing_features()
    splice = None if lacking else Sockmap(name=f"bench-capture-{os.getpid()}")
    chosen = STACKS if splice is not None else STACKS[:2]
    if lacking:
        print(f"no eBPF stacks: --ebpf needs {'; '.join(lacking)}", flush=True)
    try:
        network.clean()
        network.check_range()
        network.create_bridge()
        if splice is not None:
            splice.start()
        stacks = {
            s: _START[s][0](workdir, envoys, network, splice if _START[s][1] else None)
            for s in chosen
        }
        print(
            f"wrk -t1 -c{args.connections} -d{args.seconds}s; h2load --h1 -c4 at {args.rate} rps; "
            f"{args.rounds} round(s); load average {os.getloadavg()[0]:.2f} before",
            flush=True,
        )
        rows: dict[str, list[dict[str, float]]] = {s: [] for s in chosen}
        for _ in range(args.rounds):
            for s in chosen:
                rows[s].append(measure(stacks[s], args, workdir))
        counters = splice.stats() if splice is not None else {}
    finally:
        for envoy in envoys:
            envoy.stop()
        if splice is not None:
            splice.stop()
        network.clean()
    print_table(rows)
    if counters:
        print(f"\nsplice counters: {counters}")
    out = REPO / "bench" / "results" / "capture.json"
    doc = {"args": vars(args), "rounds": rows, "splice": counters}
    out.write_text(json.dumps(doc, indent=2))


def print_table(rows: dict[str, list[dict[str, float]]]) -> None:
    lines = [
        ("requests/s (wrk)", "rps", "{:,.0f}"),
        ("p50 at fixed rate (ms)", "p50", "{:.3f}"),
        ("p99 at fixed rate (ms)", "p99", "{:.3f}"),
        ("CPU per request, 3 Envoys (us)", "envoy_us", "{:.0f}"),
        ("CPU per request, client (us)", "client_us", "{:.0f}"),
    ]

    def ratio(stack: str, base: str, key: str) -> float:
        pairs = zip(rows[base], rows[stack], strict=True)
        return statistics.median(o[key] / x[key] for x, o in pairs)

    stacks = list(rows)
    head = "".join(f"{s:>12}" for s in stacks)
    ratios = "".join(f"{s + '/' + stacks[0]:>18}" for s in stacks[1:])
    print(f"\n{'':34}{head}{ratios}")
    for label, key, fmt in lines:
        meds = "".join(
            f"{fmt.format(statistics.median(r[key] for r in rows[s])):>12}" for s in stacks
        )
        per = "".join(f"{ratio(s, stacks[0], key):>18.2f}" for s in stacks[1:])
        print(f"{label:34}{meds}{per}")
    gains = [(o, b) for o, b in GAINS if o in rows]
    if gains:
        print("\neBPF gain, as merbridge reports it (the same path with / without the splice):")
        for stack, base in gains:
            rps, p50, p99 = (ratio(stack, base, k) for k in ("rps", "p50", "p99"))
            print(
                f"  {stack + ' vs ' + base:24} requests/s {rps:.2f}x, "
                f"p50 latency {p50 - 1:+.0%}, p99 latency {p99 - 1:+.0%}"
            )


if __name__ == "__main__":
    main()
