"""``legation up --capture`` as a user runs it: real Envoys and demo apps in network namespaces.

One run is killed (a crash: its namespaces stay) and the next removes what it left; that run
serves the tests below in file order, and the last one stops it and finds nothing left. The apps
know nothing of their sidecars: the frontend app calls ``http://reviews:9080/``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from legation.capture import netns
from legation.capture.pods import unprivileged
from legation.config.capture import Capture
from tests.capture.conftest import capture_range
from tests.conftest import distinct_ports
from tests.integration.test_up import Up, gone, http

LACKING = netns.missing()
pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(bool(LACKING), reason=f"--capture needs: {'; '.join(LACKING)}"),
]

MESH = """\
xds: {{host: 127.0.0.1, port: {xds}}}
mtls: {{mode: strict}}
capture: {{cidr: {cidr}, outbound: {{exclude_ports: [{excluded}]}},
          inbound: {{exclude_ports: [{app4}]}}}}
gateway: {{name: gw, host: 127.0.0.1, port: {gw}, admin_port: {gw_admin}}}
services:
  - name: frontend
    port: 9080
    endpoints:
      - {{name: frontend-0, port: {app1}, demo: {{}},
         sidecar: {{inbound_port: {in1}, outbound_port: {out1}, admin_port: {admin1}}}}}
  - name: reviews
    port: 9080
    endpoints:
      - {{name: reviews-0, port: {app2}, demo: {{}},
         sidecar: {{inbound_port: {in2}, outbound_port: {out2}, admin_port: {admin2}}}}}
  - name: stream
    port: 9090
    protocol: tcp
    endpoints:
      - {{name: stream-0, port: {app4}, demo: {{}},
         sidecar: {{inbound_port: {in4}, outbound_port: {out4}, admin_port: {admin4}}}}}
  - name: legacy
    port: 9080
    endpoints: [{{name: legacy-0, port: {app5}, demo: {{}}}}]
extauthz: {{port: {authz}, config: authz.yaml, timeout: 5s}}
tracing: {{port: {traces}}}
ratelimit: {{port: {rl}, config: limits.yaml, domain: mesh, backend: memory, timeout: 5s,
            failure_mode: closed}}
routes:
  - name: admin
    mesh_hosts: [reviews]
    match: {{path: {{prefix: /admin}}}}
    to: {{service: reviews}}
    authz: quickstart.authz
  - name: limited
    mesh_hosts: [reviews]
    match: {{path: {{prefix: /limited}}}}
    to: {{service: reviews}}
    rate_limits:
      - actions: [{{generic_key: {{value: limited}}}}]
  - name: reviews
    match: {{path: {{prefix: /}}}}
    to: {{service: reviews}}
"""
LIMITS = """\
domain: mesh
descriptors:
  - {key: generic_key, value: limited, rate_limit: {unit: minute, requests_per_unit: 2}}
"""
_NAMES = "xds gw gw_admin app1 in1 out1 admin1 app2 in2 out2 admin2 status excluded authz rl traces"
_NAMES = [*_NAMES.split(), "app3", "in3", "out3", "admin3", "app4", "in4", "out4", "admin4", "app5"]
# a reload adds this instance of reviews (in the file, commented out until then)
ADDED = """\
      - {{name: reviews-1, port: {app3}, labels: {{version: v2}}, demo: {{}},
         sidecar: {{inbound_port: {in3}, outbound_port: {out3}, admin_port: {admin3}}}}}
"""

# Run in a pod as its app: GET argv[1] (with Host argv[2] if given), print the status and body.
_GET = """
import sys, urllib.request, urllib.error
req = urllib.request.Request(sys.argv[1], headers={"Host": sys.argv[2]} if sys.argv[2:] else {})
try:
    with urllib.request.urlopen(req, timeout=5) as r:
        print(r.status); print(r.read().decode())
except urllib.error.HTTPError as e:
    print(e.code); print(e.read().decode())
except OSError as e:
    print(0); print(e)
"""


@dataclass
class Captured:
    up: Up
    ports: dict[str, int]
    network: netns.Network
    mesh: Path

    def pod(self, instance: str) -> netns.Pod:
        return self.network.pod(instance)

    def app_get(self, instance: str, url: str, host: str = "") -> tuple[int, str]:
        """What the app in ``instance``'s pod gets for ``url`` (with that Host header)."""
        argv = [sys.executable, "-c", _GET, url, *([host] if host else [])]
        out = subprocess.run(
            self.pod(instance).exec_argv(argv),
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
        status, _, body = out.partition("\n")
        return int(status), body

    def stats(self, instance: str, admin: str) -> dict[str, int]:
        url = f"http://{self.pod(instance).ip}:{self.ports[admin]}/stats?format=json"
        with urllib.request.urlopen(url, timeout=5) as resp:
            doc = json.loads(resp.read())
        return {s["name"]: s["value"] for s in doc["stats"] if isinstance(s.get("value"), int)}


@pytest.fixture(scope="module")
def captured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Captured]:
    tmp = tmp_path_factory.mktemp("capture")
    ports = distinct_ports(*_NAMES)
    cidr = capture_range()
    policies = Path(__file__).resolve().parents[2] / "policies" / "quickstart"
    (tmp / "authz.yaml").write_text(
        f"checks: {{rego: {{type: rego, options: {{policy_dir: {policies}}}}}}}\n"
        "default_checks: [rego]\n"
    )
    (tmp / "limits.yaml").write_text(LIMITS)
    mesh = tmp / "mesh.yaml"
    mesh.write_text(MESH.format(**ports, cidr=cidr))
    network = netns.Network(Capture(cidr=cidr))
    try:
        crashed = Up(mesh, tmp, ports["status"], flags=["--capture"])
        try:
            crashed.wait_for("Legation is up")
            apps = [_app_pid(ports[name]) for name in ("app1", "app2")]
            crashed.proc.kill()  # no clean-up: the namespaces, links and hosts files stay
            crashed.proc.wait(10)
            assert network.prefix + "reviews-0" in netns.run(["ip", "netns", "list"])
            # but no app: each is tied to it with SIGKILL (an earlier version left them running)
            assert gone(apps)
        finally:
            crashed.stop()
        up = Up(mesh, tmp, ports["status"], flags=["--capture"])
        try:
            up.wait_for("Legation is up")
            assert f"--capture: removed what an earlier run left: {network.prefix}" in up.output
            yield Captured(up, ports, network, mesh)
        finally:
            up.stop()
    finally:
        network.clean()  # whatever happened: nothing of this test's is left behind


def test_an_app_calls_a_service_by_name_through_both_sidecars(captured: Captured) -> None:
    before = captured.stats("frontend-0", "admin1")
    status, body = captured.app_get("frontend-0", "http://reviews:9080/hello")
    assert status == 200
    answer = json.loads(body)
    assert answer["service"] == "reviews" and answer["path"] == "/hello"
    # the reviews sidecar terminated mTLS from the frontend sidecar, whose SPIFFE id it forwards
    xfcc = answer["headers"]["x-forwarded-client-cert"]
    assert "URI=spiffe://cluster.local/ns/default/sa/frontend" in xfcc
    after = captured.stats("frontend-0", "admin1")
    out = "listener.outbound_frontend.downstream_cx_total"
    assert after[out] - before.get(out, 0) == 1  # one connection from the app, none looped back
    assert after["http.outbound_frontend.downstream_rq_2xx"] >= 1
    inbound = captured.stats("reviews-0", "admin2")
    assert inbound["http.inbound_reviews.downstream_rq_2xx"] >= 1
    assert inbound["listener.inbound_reviews.ssl.handshake"] >= 1


def test_a_tcp_service_is_captured_to_its_filter_chain_over_mtls(captured: Captured) -> None:
    """protocol: tcp: the outbound chain on the service's address proxies bytes (HTTP here, the
    demo app's) to the destination pod, whose sidecar terminates mTLS."""
    status, body = captured.app_get("frontend-0", "http://stream:9090/bytes")
    assert status == 200 and json.loads(body)["service"] == "stream"
    assert "x-forwarded-client-cert" not in json.loads(body)["headers"]  # no HTTP on the way
    assert captured.stats("frontend-0", "admin1")["tcp.outbound_stream.downstream_cx_total"] >= 1
    assert captured.stats("stream-0", "admin4")["listener.inbound_stream.ssl.handshake"] >= 1


def test_an_instance_without_a_sidecar_stays_on_the_host_and_pods_reach_it(
    captured: Captured,
) -> None:
    assert captured.network.prefix + "legacy-0" not in netns.run(["ip", "netns", "list"])
    status, body = captured.app_get("frontend-0", "http://legacy:9080/old")
    assert status == 200 and json.loads(body)["service"] == "legacy"


def test_an_app_port_excluded_from_inbound_capture_is_reached_directly(captured: Captured) -> None:
    """stream-0's app port is excluded: a client outside reaches the app itself (plaintext, no
    sidecar), while the mesh reaches it through its sidecar's inbound port (still mTLS)."""
    stream = captured.pod("stream-0")
    cx = "listener.inbound_stream.downstream_cx_total"
    before = captured.stats("stream-0", "admin4")[cx]
    status, body = http(f"http://{stream.ip}:{captured.ports['app4']}/direct")
    assert status == 200 and json.loads(body)["path"] == "/direct"
    assert captured.stats("stream-0", "admin4")[cx] == before
    assert captured.app_get("frontend-0", "http://stream:9090/mesh")[0] == 200
    assert captured.stats("stream-0", "admin4")[cx] == before + 1


def test_authz_and_rate_limits_apply_to_captured_traffic(captured: Captured) -> None:
    """The frontend sidecar calls ext_authz and the rate-limit service (through the relay) for
    the app's plain-URL calls, as it would for explicit ones."""
    status, body = captured.app_get("frontend-0", "http://reviews:9080/admin")
    assert status == 403 and json.loads(body)["policy"] == "quickstart.authz"
    statuses = [captured.app_get("frontend-0", "http://reviews:9080/limited")[0] for _ in range(3)]
    assert statuses == [200, 200, 429]


def test_the_explicit_outbound_port_still_works_in_a_pod(captured: Captured) -> None:
    out = captured.ports["out1"]
    status, body = captured.app_get("frontend-0", f"http://127.0.0.1:{out}/explicit", "reviews")
    assert status == 200 and json.loads(body)["path"] == "/explicit"


def test_the_app_calling_itself_through_its_service_goes_through_its_sidecar(
    captured: Captured,
) -> None:
    status, body = captured.app_get("reviews-0", "http://reviews:9080/self")
    assert status == 200 and json.loads(body)["path"] == "/self"


def test_demo_apps_call_services_by_plain_url(captured: Captured) -> None:
    app = captured.ports["app1"]
    status, body = captured.app_get("frontend-0", f"http://127.0.0.1:{app}/?call=reviews")
    assert status == 200
    assert json.loads(body)["calls"] == [{"service": "reviews", "status": 200}]


def test_inbound_is_captured_and_strict_mtls_refuses_plaintext(captured: Captured) -> None:
    reviews = captured.pod("reviews-0")
    app_stats = f"http://127.0.0.1:{captured.ports['app2']}/__demo/stats"
    served = json.loads(captured.app_get("reviews-0", app_stats)[1])["requests"]
    cx = "listener.inbound_reviews.downstream_cx_total"
    before = captured.stats("reviews-0", "admin2")[cx]
    # a client outside the mesh, straight at the app's port: the sidecar gets it, and refuses
    assert http(f"http://{reviews.ip}:{captured.ports['app2']}/")[0] == 0
    assert captured.stats("reviews-0", "admin2")[cx] == before + 1
    assert json.loads(captured.app_get("reviews-0", app_stats)[1])["requests"] == served
    # through the gateway (mTLS to the pod's app port, redirected to the sidecar) it works
    status, body = http(f"http://127.0.0.1:{captured.ports['gw']}/via-gateway")
    assert status == 200 and json.loads(body)["service"] == "reviews"


def _app_pid(port: int) -> int:
    """The pid of the pod's demo app listening on ``port`` (its command line names it)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if (
            b"demo" in argv
            and b"--port" in argv
            and argv[argv.index(b"--port") + 1] == str(port).encode()
            and b"setpriv" not in argv[0]
            and b"unshare" not in argv[0]
        ):
            return int(proc.name)
    raise AssertionError(f"no demo app on port {port}")


def test_pod_apps_run_unprivileged_and_cannot_step_out_of_capture(captured: Captured) -> None:
    """Each pod's app runs as its own user with no capabilities: it cannot rewrite its pod's
    rules (so it cannot send around its sidecar) nor signal or trace another pod's app (found by
    attacker reviews: apps ran as root, then all as one user)."""
    status = (Path("/proc") / str(_app_pid(captured.ports["app1"])) / "status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    uid = captured.network.capture.app_uid("frontend-0")
    assert uid >= 200_000 and uid != captured.network.capture.app_uid("reviews-0")
    assert fields["Uid"].split() == [str(uid)] * 4 and fields["Gid"].split() == [str(uid)] * 4
    assert fields["Groups"].strip() == ""
    for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(fields[cap], 16) == 0, cap
    assert fields["NoNewPrivs"].strip() == "1"
    # PID 1 of a namespace of its own: it sees no other pod's app, sidecar or Legation
    pid = _app_pid(captured.ports["app1"])
    assert fields["NSpid"].split() == [str(pid), "1"]
    assert os.readlink(f"/proc/{pid}/ns/pid") != os.readlink("/proc/self/ns/pid")
    other_ns = os.readlink(f"/proc/{_app_pid(captured.ports['app2'])}/ns/pid")
    assert os.readlink(f"/proc/{pid}/ns/pid") != other_ns
    pod = captured.pod("frontend-0")

    def rules() -> list[str]:  # without the "# Generated ... on <date>" comments
        out = netns.run(pod.exec_argv(["iptables-save", "-t", "nat"]))
        return [line for line in out.splitlines() if not line.startswith("#")]

    before = rules()
    as_app = subprocess.run(
        pod.exec_argv([*unprivileged(uid), "iptables", "-t", "nat", "-F"]),
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert as_app.returncode != 0 and "denied" in (as_app.stderr + as_app.stdout).lower()
    assert rules() == before and any("LEGATION" in line for line in before)
    other = str(_app_pid(captured.ports["app2"]))  # the reviews pod's app: another user
    signal_it = subprocess.run(
        [*unprivileged(uid), "kill", "-0", other], capture_output=True, text=True, timeout=20
    )
    assert signal_it.returncode != 0 and "not permitted" in signal_it.stderr.lower()
    status_code, body = captured.app_get("frontend-0", "http://reviews:9080/")
    assert status_code == 200, body  # the app still reaches the mesh through its sidecar


def test_only_the_sidecar_reaches_the_relayed_host_ports(captured: Captured) -> None:
    """The pods reach the control plane and the services through a relay on the bridge address;
    the app may not (its connection is reset), its sidecar does (it is in sync)."""
    bridge = captured.network.capture.bridge_ip
    passed = "cluster.passthrough.upstream_cx_total"
    before = captured.stats("frontend-0", "admin1").get(passed, 0)
    status, error = captured.app_get("frontend-0", f"http://{bridge}:{captured.ports['xds']}/")
    assert status == 0 and "connection refused" in error.lower()  # the pod's REJECT, tcp-reset
    assert captured.stats("frontend-0", "admin1").get(passed, 0) == before  # not via the sidecar
    doc = json.loads(http(f"http://127.0.0.1:{captured.ports['status']}/status")[1])
    frontend = next(p for p in doc["proxies"] if p["node_id"] == "sidecar-frontend-0")
    assert frontend["in_sync"]
    assert frontend["admin"] == f"{captured.pod('frontend-0').ip}:{captured.ports['admin1']}"


def test_pod_sidecars_export_spans_over_mtls_through_the_relay(captured: Captured) -> None:
    """The embedded receiver listens on the host's loopback; the pods' sidecars reach it over
    the relay, in mutual TLS (strict mesh): one request is one trace across both sidecars."""
    status, body = captured.app_get("frontend-0", "http://reviews:9080/traced")
    assert status == 200
    trace_id = json.loads(body)["headers"]["traceparent"].split("-")[1]
    url = f"http://127.0.0.1:{captured.ports['status']}/traces?id={trace_id}"
    deadline = time.monotonic() + 20  # Envoy flushes every 5 s
    services: set[str] = set()
    while time.monotonic() < deadline and not {"frontend", "reviews"} <= services:
        found = json.loads(http(url)[1])["traces"]
        services = {s["service"] for t in found for s in t["spans"]}
        time.sleep(0.25)
    assert {"frontend", "reviews"} <= services
    for instance, admin in (("frontend-0", "admin1"), ("reviews-0", "admin2")):
        stats = captured.stats(instance, admin)
        assert stats["cluster.legation|tracing.ssl.handshake"] >= 1, instance
    doc = json.loads(http(f"http://127.0.0.1:{captured.ports['status']}/status")[1])
    assert (doc["tracing"]["tls"], doc["tracing"]["refused"]) == ("mesh", 0)


class _Hello(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"outside"
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def outside(captured: Captured) -> Iterator[tuple[str, int, int]]:
    """Servers on the host's bridge address (outside the mesh): (address, a port, the excluded
    port)."""
    bridge = captured.network.capture.bridge_ip
    servers = [
        ThreadingHTTPServer((bridge, port), _Hello) for port in (0, captured.ports["excluded"])
    ]
    for s in servers:
        threading.Thread(target=s.serve_forever, daemon=True).start()
    yield bridge, servers[0].server_address[1], captured.ports["excluded"]
    for s in servers:
        s.shutdown()
        s.server_close()


def test_other_destinations_pass_through_and_the_sidecar_is_not_looped(
    captured: Captured, outside: tuple[str, int, int]
) -> None:
    bridge, port, _ = outside
    before = captured.stats("frontend-0", "admin1")
    assert captured.app_get("frontend-0", f"http://{bridge}:{port}/") == (200, "outside\n")
    after = captured.stats("frontend-0", "admin1")
    out = "listener.outbound_frontend.downstream_cx_total"
    assert after[out] - before[out] == 1
    passed = "cluster.passthrough.upstream_cx_total"
    assert after[passed] - before.get(passed, 0) == 1
    # Envoy runs under the proxy group, which the rules leave alone
    pids = subprocess.run(
        ["pgrep", "-f", f"envoy.*{captured.up.log_dir}/sidecar-frontend-0"],
        capture_output=True,
        text=True,
    ).stdout.split()
    assert pids
    status = Path(f"/proc/{pids[0]}/status").read_text()
    gid = next(line for line in status.splitlines() if line.startswith("Gid:"))
    assert gid.split()[1:] == ["1337"] * 4


def test_an_excluded_port_bypasses_the_sidecar(
    captured: Captured, outside: tuple[str, int, int]
) -> None:
    bridge, _, excluded = outside
    out = "listener.outbound_frontend.downstream_cx_total"
    before = captured.stats("frontend-0", "admin1")[out]
    assert captured.app_get("frontend-0", f"http://{bridge}:{excluded}/") == (200, "outside\n")
    assert captured.stats("frontend-0", "admin1")[out] == before


def test_a_reload_may_not_move_the_range(captured: Captured) -> None:
    text = captured.mesh.read_text()
    cidr = str(captured.network.capture.cidr)
    elsewhere = str(captured.network.capture.cidr.supernet(new_prefix=16))
    captured.mesh.write_text(text.replace(f"cidr: {cidr}", f"cidr: {elsewhere}"))
    try:
        captured.up.wait_for(
            f"{captured.mesh}: capture.cidr: cannot change while running: restart legation up"
        )
    finally:
        captured.mesh.write_text(text)
    status, _ = captured.app_get("frontend-0", "http://reviews:9080/")
    assert status == 200  # still served by the generation the pods match


def test_a_reload_adds_a_pod_whose_instance_takes_traffic(captured: Captured) -> None:
    text = captured.mesh.read_text()
    anchor = f"         sidecar: {{inbound_port: {captured.ports['in2']}"
    line_end = text.index("\n", text.index(anchor)) + 1
    captured.mesh.write_text(text[:line_end] + ADDED.format(**captured.ports) + text[line_end:])
    captured.up.wait_for("their Envoys started: sidecar-reviews-1")
    assert captured.pod("reviews-1").netns in netns.run(["ip", "netns", "list"])
    versions: set[str] = set()
    deadline = time.monotonic() + 30
    while versions != {"v1", "v2"} and time.monotonic() < deadline:
        status, body = captured.app_get("frontend-0", "http://reviews:9080/")
        if status == 200:
            versions.add(json.loads(body)["version"])
    assert versions == {"v1", "v2"}


def test_a_stop_leaves_nothing(captured: Captured) -> None:
    """Last in the file: it stops the run the others used."""
    envoys = captured.up.envoy_pids()
    apps = [_app_pid(captured.ports[name]) for name in ("app1", "app2")]
    captured.up.proc.send_signal(signal.SIGINT)
    assert captured.up.proc.wait(30) == 0
    assert gone(envoys)
    assert gone(apps)  # PID 1 of their namespaces, under an unshare that ignores SIGTERM
    net = captured.network
    assert net.prefix not in netns.run(["ip", "netns", "list"])
    links = netns.run(["ip", "-o", "link", "show"])
    assert net.bridge not in links and f"lg{net.tag}" not in links
    assert not list(netns.ETC_NETNS.glob(net.prefix + "*"))
    assert "--capture: removed" in captured.up.output
