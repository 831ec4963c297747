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
bridge between the pods where the explicit stack stays on loopback. Per round and stack: ``wrk
-t1 -cN`` (requests/s), then ``h2load --h1`` at a fixed rate (p50/p99 in ms), and CPU per request
of the three Envoys and of the client. Medians over the rounds; each ratio is the median of the
per-round ratios. A third stack (``STACKS``, ``_START``) is where an eBPF variant plugs in. Needs
root; everything it made is removed at the end.
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
from legation.capture.rules import pod_rules
from legation.config.capture import Capture
from legation.envoy_process import EnvoyProcess
from legation.translate._capture import ORIGINAL_DST_FILTER

REPO = Path(__file__).resolve().parents[1]
STACKS = ("explicit", "iptables")
RANGE = "10.214.0.0/24"
SERVICE_PORT = 9080
Stack = tuple[list[str], str, list[EnvoyProcess]]  # client prefix, URL, the three Envoys


def _admin_on(config: dict[str, Any], host: str) -> dict[str, Any]:
    config["admin"]["address"]["socket_address"]["address"] = host
    return config


def _start(envoys: list[EnvoyProcess], name: str, config: dict[str, Any], admin: int,
           workdir: Path, **where: Any) -> EnvoyProcess:  # fmt: skip
    envoy = EnvoyProcess(config, admin_port=admin, name=name, log_dir=workdir, **where).start()
    envoys.append(envoy)
    return envoy


def start_explicit(workdir: Path, envoys: list[EnvoyProcess], network: netns.Network) -> Stack:
    port, mine = start_stack("explicit", workdir, envoys, None)
    return [], f"http://127.0.0.1:{port}/", mine


def start_iptables(workdir: Path, envoys: list[EnvoyProcess], network: netns.Network) -> Stack:
    from tests.conftest import distinct_ports

    cap = network.capture
    p = distinct_ports("app", "app_admin", "b_in", "b_out", "b_admin", "a_out", "a_admin", "a_in")
    a, b = network.pod("bench-a"), network.pod("bench-b")
    network.add_pod(a, hosts="127.0.0.1 localhost\n", rules=pod_rules(
        cap, pod_ip=a.ip, app_port=p["a_in"], inbound_port=p["a_in"], outbound_port=p["a_out"],
        admin_port=p["a_admin"]))  # fmt: skip
    network.add_pod(b, hosts="127.0.0.1 localhost\n", rules=pod_rules(
        cap, pod_ip=b.ip, app_port=p["app"], inbound_port=p["b_in"], outbound_port=p["b_out"],
        admin_port=p["b_admin"]))  # fmt: skip
    proxy = {"gid": cap.proxy_gid}
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
        _start(envoys, "iptables-app", app, p["app_admin"], workdir, admin_host=b.ip,
               netns=b.netns),
        _start(envoys, "iptables-sidecar-b", inbound, p["b_admin"], workdir, admin_host=b.ip,
               netns=b.netns, **proxy),
        _start(envoys, "iptables-sidecar-a", outbound, p["a_admin"], workdir, admin_host=a.ip,
               netns=a.netns, **proxy),
    ]  # fmt: skip
    for envoy in mine:
        envoy.wait_live()
    url = f"http://{cap.service_ip('app')}:{SERVICE_PORT}/"
    _wait_ok(a.exec_argv([]), url)
    return a.exec_argv([]), url, mine


_START: dict[str, Callable[[Path, list[EnvoyProcess], netns.Network], Stack]] = {
    "explicit": start_explicit,
    "iptables": start_iptables,
}


def _run(argv: list[str], timeout: float) -> str:
    import subprocess

    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
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

    prefix, url, envoys = stack
    pids = [e.proc.pid for e in envoys if e.proc is not None]
    envoy_cpu, client_cpu = sum(cpu_seconds(p) for p in pids), _client_cpu()
    out = _run([*prefix, "wrk", "-t1", f"-c{args.connections}", f"-d{args.seconds}s", url],
               args.seconds + 30)  # fmt: skip
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
          f"--log-file={log}", url], args.seconds + 30)  # fmt: skip
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
    try:
        network.clean()
        network.check_range()
        network.create_bridge()
        stacks = {s: _START[s](workdir, envoys, network) for s in STACKS}
        print(
            f"wrk -t1 -c{args.connections} -d{args.seconds}s; h2load --h1 -c4 at {args.rate} rps; "
            f"{args.rounds} round(s); load average {os.getloadavg()[0]:.2f} before",
            flush=True,
        )
        rows: dict[str, list[dict[str, float]]] = {s: [] for s in STACKS}
        for _ in range(args.rounds):
            for s in STACKS:
                rows[s].append(measure(stacks[s], args, workdir))
    finally:
        for envoy in envoys:
            envoy.stop()
        network.clean()
    print_table(rows)
    out = REPO / "bench" / "results" / "capture.json"
    out.write_text(json.dumps({"args": vars(args), "rounds": rows}, indent=2))


def print_table(rows: dict[str, list[dict[str, float]]]) -> None:
    lines = [
        ("requests/s (wrk)", "rps", "{:,.0f}"),
        ("p50 at fixed rate (ms)", "p50", "{:.3f}"),
        ("p99 at fixed rate (ms)", "p99", "{:.3f}"),
        ("CPU per request, 3 Envoys (us)", "envoy_us", "{:.0f}"),
        ("CPU per request, client (us)", "client_us", "{:.0f}"),
    ]
    base = STACKS[0]
    head = "".join(f"{s:>12}" for s in STACKS)
    ratios = "".join(f"{s + '/' + base:>20}" for s in STACKS[1:])
    print(f"\n{'':34}{head}{ratios}")
    for label, key, fmt in lines:
        meds = "".join(
            f"{fmt.format(statistics.median(r[key] for r in rows[s])):>12}" for s in STACKS
        )
        per = "".join(
            f"{statistics.median(o[key] / x[key] for x, o in zip(rows[base], rows[s], strict=True)):>20.2f}"  # noqa: E501
            for s in STACKS[1:]
        )
        print(f"{label:34}{meds}{per}")


if __name__ == "__main__":
    main()
