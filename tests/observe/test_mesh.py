"""Golden metrics and access logs wired end to end: a control plane (its access-log and ext_authz
services embedded) configures a gateway and two sidecars over ADS; a known request mix through
them comes out of ``/status``, ``/metrics``, ``legation top`` and the JSON access logs, and the
credentials the requests carried come out of none of them."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from legation import cli
from legation.demo import DemoApp
from legation.observe.prometheus import metric_names
from legation.observe.window import bucket_of
from tests.conftest import distinct_ports
from tests.envoy_stack import MeshWorld

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
N_OK, M_5XX, K_SLOW, A_ADMIN, P_PAIR = 12, 5, 4, 3, 6
DELAY_MS = 220  # bucket (200, 300] ms
TOKEN = "sekrit-token-4711"
COOKIE = "cookie-value-0815"
QUERY = "query-token-2342"
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"

MESH = """\
xds: {{port: {xds}}}
gateway: {{name: gw, port: {gw}, admin_port: {gw_admin}}}
extauthz: {{port: {authz}, config: authz.yaml}}
tracing: {{collector: "127.0.0.1:{otlp}", sampling: 100}}  # nothing listens: spans are dropped
accesslog:
  port: {als}
  flush_interval: 100ms
  log: {{to: file, path: "{logs}/access-{{node}}.jsonl"}}
  proxies: {{sidecar-api-0: {{to: service, path: "{logs}/service-{{node}}.jsonl"}}}}
services:
  - name: web
    port: 9080
    endpoints:
      - {{port: {web}, sidecar: {{inbound_port: {web_in}, outbound_port: {web_out},
          admin_port: {web_admin}}}}}
  - name: api
    port: 9080
    endpoints:
      - {{port: {api}, sidecar: {{inbound_port: {api_in}, outbound_port: {api_out},
          admin_port: {api_admin}}}}}
routes:
  - {{name: boom, match: {{path: {{prefix: /boom}}}}, to: {{service: web}},
     fault: {{abort: {{percent: 100, status: 503}}}}}}
  - {{name: slow, match: {{path: {{prefix: /slow}}}}, to: {{service: web}},
     fault: {{delay: {{percent: 100, duration: {delay}ms}}}}}}
  - {{name: admin, match: {{path: {{prefix: /admin}}}}, to: {{service: web}},
     authz: quickstart.authz}}
  - {{name: web, match: {{path: {{prefix: /}}}}, to: {{service: web}}}}
"""

AUTHZ = f"""\
checks:
  rego: {{type: rego, options: {{policy_dir: {REPO / "policies" / "quickstart"}}}}}
default_checks: [rego]
"""


def get(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


class World(MeshWorld):
    def __init__(self, tmp: Path) -> None:
        self.apps = {n: DemoApp(name=n).start_in_thread() for n in ("web", "api")}
        self.ports = distinct_ports(
            "xds", "gw", "gw_admin", "authz", "als", "status", "otlp",
            "web_in", "web_out", "web_admin", "api_in", "api_out", "api_admin",
        )  # fmt: skip
        self.logs = tmp / "logs"
        self.logs.mkdir()
        (tmp / "authz.yaml").write_text(AUTHZ)
        mesh = tmp / "mesh.yaml"
        mesh.write_text(
            MESH.format(
                **self.ports,
                web=self.apps["web"].port,
                api=self.apps["api"].port,
                logs=self.logs,
                delay=DELAY_MS,
            )
        )
        super().__init__(tmp, mesh, status_port=self.ports["status"])

    def golden(self) -> dict[str, Any]:
        _, body = get(self.ports["status"], "/status")
        golden: dict[str, Any] = json.loads(body)["golden"]
        return golden

    def close(self) -> None:
        super().close()
        for app in self.apps.values():
            app.stop_thread()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    w = World(tmp_path_factory.mktemp("golden-mesh"))
    try:
        w.start()
        _send_mix(w)
        yield w
    finally:
        w.close()


def _send_mix(w: World) -> None:
    gw = w.ports["gw"]
    secrets = {"authorization": f"Bearer {TOKEN}", "cookie": f"session={COOKIE}"}
    assert [get(gw, f"/ok/{i}", secrets)[0] for i in range(N_OK)] == [200] * N_OK
    assert [get(gw, "/boom", secrets)[0] for _ in range(M_5XX)] == [503] * M_5XX
    assert [get(gw, "/slow", secrets)[0] for _ in range(K_SLOW)] == [200] * K_SLOW
    denied = {**secrets, "traceparent": TRACEPARENT, "x-request-id": "req-denied-1"}
    assert [get(gw, f"/admin?access_token={QUERY}", denied)[0] for _ in range(A_ADMIN)] == [
        403
    ] * A_ADMIN
    # inside the mesh: web's sidecar (outbound) to api's sidecar (inbound)
    mesh_call = {"host": "api", **secrets}
    assert [get(w.ports["web_out"], "/x", mesh_call)[0] for _ in range(P_PAIR)] == [200] * P_PAIR
    total = N_OK + M_5XX + K_SLOW + A_ADMIN
    deadline = time.monotonic() + 20
    while True:
        proxies = {r["labels"]["proxy"]: r["total"] for r in w.golden()["scopes"]["proxy"]}
        # every request: once at the sending proxy, once more at each sidecar inbound it reached
        want = {
            "gateway-gw": total,
            "sidecar-web-0": N_OK + K_SLOW + P_PAIR,
            "sidecar-api-0": P_PAIR,
        }
        if proxies == want:
            return
        assert time.monotonic() < deadline, proxies


def _rows(golden: dict[str, Any], scope: str) -> dict[tuple[str, ...], dict[str, Any]]:
    return {tuple(r["labels"].values()): r for r in golden["scopes"][scope]}


def test_status_carries_golden_metrics_of_the_mix(world: World) -> None:
    golden = world.golden()
    routes = _rows(golden, "route")
    assert {k: (r["total"], r["failures"]) for k, r in routes.items()} == {
        ("web",): (N_OK, 0),
        ("boom",): (M_5XX, M_5XX),
        ("slow",): (K_SLOW, 0),
        ("admin",): (A_ADMIN, 0),  # a 403 is an answer, not a failure
        ("api-default",): (P_PAIR, 0),  # web's sidecar, outbound; inbound sides not counted
    }
    slow = routes[("slow",)]["windows"]["60"]
    assert slow["requests"] == K_SLOW
    assert bucket_of(slow["p50_ms"]) == bucket_of(DELAY_MS)
    assert bucket_of(routes[("web",)]["windows"]["60"]["p50_ms"]) < bucket_of(DELAY_MS)
    assert routes[("boom",)]["windows"]["60"]["success"] == 0.0
    pairs = _rows(golden, "pair")
    assert pairs[("gw", "web")]["total"] == N_OK + K_SLOW
    assert pairs[("web", "api")]["total"] == P_PAIR


def test_metrics_endpoint_parses_and_holds_the_documented_names(world: World) -> None:
    _, body = get(world.ports["status"], "/metrics")
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    assert set(metric_names()) <= set(families)
    assert {"legation_accesslog_entries", "legation_accesslog_streams"} <= set(families)
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in families.values()
        for s in f.samples
    }
    assert samples[("legation_golden_route_failures_total", (("route", "boom"),))] == M_5XX
    for name in families:
        assert name.startswith("legation_"), name  # one naming scheme


def test_envoy_stats_carry_the_control_planes_tags(world: World) -> None:
    _, body = get(world.ports["gw_admin"], "/stats/prometheus")
    samples = [
        s
        for f in text_string_to_metric_families(body.decode())
        for s in f.samples
        if not s.name.startswith("envoy_filesystem_")  # made before the stats config is read
    ]
    assert len(samples) > 100
    assert all(s.labels.get("legation_node") == "gateway-gw" for s in samples)
    assert {s.labels.get("legation_service") for s in samples} == {"gw"}
    slow = [
        s.value
        for s in samples
        if s.name == "envoy_vhost_route_upstream_rq_completed_total"
        and s.labels.get("envoy_route") == "slow"
    ]
    assert slow == [K_SLOW]  # route-level stats, named after the mesh route


def _lines(world: World) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 10
    while True:
        lines = [
            json.loads(line)
            for f in sorted(world.logs.glob("access-*.jsonl"))
            # whole lines only: Envoy may be writing the next one while we read
            for line in f.read_text().rpartition("\n")[0].splitlines()
        ]
        # the gateway's, web's inbound and outbound; api's are the service's (below)
        if len(lines) >= N_OK + M_5XX + K_SLOW + A_ADMIN + N_OK + K_SLOW + P_PAIR:
            return lines
        assert time.monotonic() < deadline, len(lines)
        time.sleep(0.1)


def test_an_access_log_line_carries_request_trace_and_decision_ids(world: World) -> None:
    lines = _lines(world)
    denied = [e for e in lines if e["route"] == "admin"]
    assert len(denied) == A_ADMIN
    for e in denied:
        assert e["request_id"] != "req-denied-1"  # the gateway is the edge: its own ids
        assert len(e["request_id"]) == 36
        assert e["traceparent"] == TRACEPARENT
        assert e["trace_id"] == TRACEPARENT.split("-")[1]  # the gateway continued that trace
        assert len(e["decision_id"]) == 32
        assert (e["node"], e["listener"], e["response_code"]) == ("gateway-gw", "gateway", 403)
        assert e["response_flags"] == "UAEX" and e["path"] == "/admin"
    assert len({e["decision_id"] for e in denied}) == A_ADMIN  # one decision per request
    boom = [e for e in lines if e["route"] == "boom"]
    assert {(e["response_code"], e["response_flags"]) for e in boom} == {(503, "FI")}
    # the request id joins a request's lines across proxies: gateway -> web's sidecar inbound
    at_gw = {e["request_id"] for e in lines if e["route"] in ("web", "slow")}
    at_web = {
        e["request_id"] for e in lines if (e["node"], e["listener"]) == ("sidecar-web-0", "inbound")
    }
    assert len(at_gw) == N_OK + K_SLOW and at_gw <= at_web


def test_the_access_log_service_writes_the_lines_of_a_proxy_configured_so(world: World) -> None:
    proxies = _lines(world)
    path = world.logs / "service-sidecar-api-0.jsonl"
    deadline = time.monotonic() + 10
    while not path.exists() or len(path.read_text().splitlines()) < P_PAIR:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert not (world.logs / "access-sidecar-api-0.jsonl").exists()  # not the proxy's own
    assert set(lines[0]) == set(proxies[0])  # the same fields as a proxy's own lines
    assert {(e["node"], e["listener"], e["route"], e["response_code"]) for e in lines} == {
        ("sidecar-api-0", "inbound", "inbound-api", 200)
    }
    assert {e["upstream_host"] for e in lines} == {f"127.0.0.1:{world.apps['api'].port}"}
    assert {(e["method"], e["path"], e["protocol"]) for e in lines} == {("GET", "/x", "HTTP/1.1")}
    assert all(e["upstream_service_time_ms"] is not None for e in lines)
    # the request id joins them to the lines web's sidecar wrote for the same requests
    sent = {e["request_id"] for e in proxies if e["route"] == "api-default"}
    assert {e["request_id"] for e in lines} == sent and len(sent) == P_PAIR


def test_credentials_appear_in_no_log_and_no_metric(world: World) -> None:
    _lines(world)
    outputs = [p.read_bytes() for p in world.tmp.rglob("*") if p.is_file() and p.suffix != ".yaml"]
    outputs += [get(world.ports["status"], p)[1] for p in ("/metrics", "/status")]
    outputs += [get(world.ports[p], "/stats/prometheus")[1] for p in ("gw_admin", "web_admin")]
    assert any(TRACEPARENT.encode() in o for o in outputs)  # the search finds what is there
    for secret in (TOKEN, COOKIE, QUERY):
        assert not [o[:80] for o in outputs if secret.encode() in o], secret


def test_top_once_prints_the_tables(world: World, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{world.ports['status']}"
    assert cli.main(["top", "--once", "--url", url, "--window", "60"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "window 60s"
    boom = next(line for line in lines if line.startswith("boom "))
    assert boom.split()[2] == "0.00%"
    assert any(line.split()[:2] == ["web", "api"] for line in lines)
    assert cli.main(["status", "--url", url]) == 0
    status = capsys.readouterr().out
    assert "golden metrics" in status and "slow" in status
