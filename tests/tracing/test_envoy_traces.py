"""Traces through real Envoys: a gateway and two sidecars (gateway -> frontend's sidecar ->
the frontend app calling reviews through its sidecar's outbound listener -> reviews' sidecar),
with strict mTLS, the control plane's embedded services (ext_authz over HTTP and gRPC, ext_proc,
rate limit) and its embedded OTLP receiver, which the mesh's mTLS puts on mutual TLS too.

One request is one trace: the Envoy spans of all three proxies and Legation's spans (the check,
the ext_proc stream, the rate-limit decision) under one trace id, each Legation span a child of
the Envoy span that called it. A route's sampling rate holds within a binomial bound, and a trace
is whole or absent. No token, cookie or authorization value is in any span. ``legation traces``
prints the waterfall. What Envoy applied is read back from its /config_dump. Every proxy
reached the receiver over TLS handshakes, and an outsider (plaintext, a certificate from another
CA, an xDS credential) cannot export, nor a mesh workload under another's name: none of what
they sent is stored.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest

from legation.certs import CertificateAuthority
from legation.demo import DemoApp
from tests.conftest import distinct_ports
from tests.envoy_stack import MeshWorld
from tests.tracing.clients import export_one

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
SECRETS = (
    "Bearer eyJhbGciOiJSUzI1NiJ9.SECRET-TOKEN",
    "SECRET-COOKIE",
    "SECRET-API-KEY",
    "SECRET-QUERY-TOKEN",
)

POLICY = """\
package trace.authz

import rego.v1

default allow := {"allowed": false, "http_status": 403, "body": "{\\"error\\":\\"forbidden\\"}"}

allow := {"allowed": true} if input.attributes.request.http.headers["x-role"] == "admin"
"""

MESH = """\
xds: {{port: {xds}}}
mtls: {{mode: strict, ca_dir: ca, cert_ttl: 1h}}
tracing: {{port: {col}, sampling: 100}}
gateway: {{name: ingress, port: {gw}, admin_port: {gwa}}}
extauthz:
  port: {authz}
  config: authz.yaml
  protocol: http
  http_port: {authz_http}
  http_headers: {{request: [x-role, authorization, cookie, x-api-key]}}
extproc: {{port: {proc}}}
ratelimit: {{port: {rl}, config: limits.yaml, domain: test}}
services:
  - name: frontend
    port: 9080
    endpoints:
      - {{port: {front}, sidecar: {{inbound_port: {in1}, outbound_port: {out1}, admin_port: {a1}}}}}
  - name: reviews
    port: 9080
    endpoints:
      - {{port: {reviews},
         sidecar: {{inbound_port: {in2}, outbound_port: {out2}, admin_port: {a2}}}}}
routes:
  - name: admin
    match: {{path: {{prefix: /admin}}}}
    to: {{service: frontend}}
    authz: trace.authz
  - name: admin-grpc
    match: {{path: {{prefix: /grpc-admin}}}}
    to: {{service: frontend}}
    authz: trace.authz
    authz_protocol: grpc
  - name: half
    match: {{path: {{prefix: /half}}}}
    to: {{service: frontend}}
    tracing: {{sampling: 50}}
  - name: never
    match: {{path: {{prefix: /never}}}}
    to: {{service: frontend}}
    tracing: {{sampling: 0}}
  - name: reviews
    mesh_hosts: [reviews]
    to: {{service: reviews}}
    filters: [{{name: headers, options: {{request: {{set: {{x-tag: t}}}}}}}}]
    rate_limits: [{{actions: [{{generic_key: {{value: reviews}}}}]}}]
  - name: front
    to: {{service: frontend}}
"""


class World(MeshWorld):
    def __init__(self, tmp: Path) -> None:
        self.p = distinct_ports(
            *("xds", "gw", "gwa", "authz", "authz_http", "proc", "rl", "col", "status"),
            *("in1", "out1", "a1", "in2", "out2", "a2"),
        )
        self.reviews = DemoApp(name="reviews").start_in_thread()
        self.front = DemoApp(name="frontend", outbound=("127.0.0.1", self.p["out1"]))
        self.front.start_in_thread()
        policies = tmp / "policies"
        policies.mkdir()
        (policies / "trace.rego").write_text(POLICY)
        (tmp / "authz.yaml").write_text(
            f"checks:\n  rego: {{type: rego, options: {{policy_dir: {policies}}}}}\n"
            "default_checks: [rego]\n"
        )
        (tmp / "limits.yaml").write_text(
            "domain: test\ndescriptors:\n  - key: generic_key\n    value: reviews\n"
            "    rate_limit: {unit: minute, requests_per_unit: 100000}\n"
        )
        mesh = tmp / "mesh.yaml"
        mesh.write_text(MESH.format(**self.p, front=self.front.port, reviews=self.reviews.port))
        super().__init__(tmp, mesh, status_port=self.p["status"])

    def get(self, path: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.p['gw']}{path}", headers=headers or {}
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            body: dict[str, Any] = json.loads(resp.read())
            return body

    def traces(self, query: str = "") -> dict[str, Any]:
        url = f"http://127.0.0.1:{self.cp.status_port}/traces?{query}"
        with urllib.request.urlopen(url, timeout=5) as resp:
            doc: dict[str, Any] = json.loads(resp.read())
            return doc

    def wait_trace(self, trace_id: str, *, spans: int) -> list[dict[str, Any]]:
        """The trace's spans once ``spans`` of them arrived (Envoy flushes every 5 s)."""
        deadline = time.monotonic() + 20
        while True:
            found = self.traces(f"id={trace_id}")["traces"]
            got = found[0]["spans"] if found else []
            if len(got) >= spans or time.monotonic() > deadline:
                return got
            time.sleep(0.25)

    def close(self) -> None:
        super().close()
        self.front.stop_thread()
        self.reviews.stop_thread()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    w = World(tmp_path_factory.mktemp("traces"))
    try:
        w.start()
        yield w
    finally:
        w.close()


def settled(world: World, query: str, ids: set[str]) -> list[dict[str, Any]]:
    """The traces of ``ids`` that ``query`` finds, once Envoy's flush timer (5 s) has run and
    two reads a second apart agree (at most 25 s)."""
    time.sleep(5.5)
    deadline, last = time.monotonic() + 20, None
    while True:
        found = [t for t in world.traces(query)["traces"] if t["trace_id"] in ids]
        shape = sorted((t["trace_id"], len(t["spans"])) for t in found)
        if shape == last or time.monotonic() > deadline:
            return found
        last = shape
        time.sleep(1)


def trace_id_of(body: dict[str, Any]) -> str:
    return str(body["headers"]["traceparent"].split("-")[1])


def by_name(spans: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(s["service"], s["name"]): s for s in spans}


@pytest.mark.parametrize(
    ("path", "route", "transport"),
    [("/admin", "admin", "http"), ("/grpc-admin", "admin-grpc", "grpc")],
)
def test_one_request_is_one_trace_across_proxies_and_legation(
    world: World, path: str, route: str, transport: str
) -> None:
    body = world.get(f"{path}?call=reviews", {"x-role": "admin"})
    assert body["calls"] == [{"service": "reviews", "status": 200}]
    trace_id = trace_id_of(body)
    spans = world.wait_trace(trace_id, spans=10)
    assert {s["trace_id"] for s in spans} == {trace_id}
    named = by_name(spans)
    gateway = named[("ingress", "ingress")]
    front_in = next(s for s in spans if s["service"] == "frontend" and s["kind"] == "server")
    front_out = named[("frontend", "egress reviews")]
    reviews_in = named[("reviews", "ingress")]
    check = named[("legation-extauthz", "legation.extauthz check")]
    stream = named[("legation-extproc", "legation.extproc stream")]
    decision = named[("legation-ratelimit", "legation.ratelimit decision")]
    by_id = {s["span_id"]: s for s in spans}
    # the proxies' chain: gateway -> frontend inbound; frontend outbound -> reviews inbound
    assert gateway["parent_id"] == "" and gateway["attributes"]["route"] == route
    assert front_in["parent_id"] == gateway["span_id"]
    assert by_id[reviews_in["parent_id"]] is front_out
    # each Legation span is a child of the Envoy call-out span of the proxy that called it
    assert by_id[check["parent_id"]]["service"] == "ingress"
    assert "Authorization" in by_id[check["parent_id"]]["name"] or transport == "http"
    assert by_id[stream["parent_id"]]["name"].endswith("ExternalProcessor.Process egress")
    assert by_id[decision["parent_id"]]["name"].endswith("ShouldRateLimit egress")
    assert by_id[stream["parent_id"]]["service"] == "frontend"
    # what they did, as attributes
    assert check["attributes"] == {
        "legation.decision": "allow",
        "legation.policy": "trace.authz",
        "legation.checks": "rego",
        "legation.transport": transport,
    }
    assert stream["attributes"]["legation.chain"] == "reviews"
    assert stream["attributes"]["legation.filters"] == "headers"
    assert decision["attributes"] == {
        "legation.domain": "test",
        "legation.descriptors": "generic_key",
        "legation.decision": "OK",
        "legation.limit": "100000/minute",
    }


def test_a_denial_is_in_the_check_span(world: World) -> None:
    req = urllib.request.Request(f"http://127.0.0.1:{world.p['gw']}/grpc-admin")
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req, timeout=10)
    info.value.close()  # its socket, else closed by the garbage collector with a warning
    assert info.value.code == 403
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        spans = [
            s for t in world.traces("route=admin-grpc&limit=100")["traces"] for s in t["spans"]
        ]
        denied = [s for s in spans if s["attributes"].get("legation.decision") == "deny"]
        if denied:
            assert denied[0]["attributes"]["legation.code"] == "denied"
            return
        time.sleep(0.25)
    pytest.fail("no span of the denied check")


def test_route_sampling_holds_within_a_binomial_bound_and_traces_are_whole(world: World) -> None:
    n = 200
    ids = {trace_id_of(world.get("/half?call=reviews")) for _ in range(n)}
    for _ in range(20):
        world.get("/never?call=reviews")
    sampled = settled(world, "route=half&limit=1000", ids)
    # Binomial(200, 0.5): mean 100, sd 7.07; 5 sd either side fails a correct Envoy ~1e-6
    assert 65 <= len(sampled) <= 135, len(sampled)
    for t in sampled:  # whole or absent: the sidecars followed the gateway's decision
        services = {s["service"] for s in t["spans"]}
        assert {"ingress", "frontend", "reviews"} <= services, [
            (s["service"], s["name"], s["parent_id"]) for s in t["spans"]
        ]
    assert world.traces("route=never&limit=100")["traces"] == []


def test_no_token_cookie_or_authorization_value_in_any_span(world: World) -> None:
    headers = {
        "authorization": SECRETS[0],
        "cookie": f"session={SECRETS[1]}",
        "x-api-key": SECRETS[2],
        "x-role": "admin",
    }
    query = f"call=reviews&access_token={SECRETS[3]}"
    ids = [trace_id_of(world.get(f"{p}?{query}", headers)) for p in ("/admin", "/grpc-admin")]
    for trace_id in ids:
        assert len(world.wait_trace(trace_id, spans=10)) >= 10
    everything = json.dumps(world.traces("limit=100"))
    for secret in (*SECRETS, "eyJhbGciOiJSUzI1NiJ9", "session=", "access_token"):
        assert secret not in everything
    assert '"http.url": "http://127.0.0.1:' in everything  # kept, without its query


def test_envoy_applied_the_tracer_and_the_route_rates(world: World) -> None:
    url = f"http://127.0.0.1:{world.p['gwa']}/config_dump?resource=dynamic_listeners"
    with urllib.request.urlopen(url, timeout=5) as resp:
        listeners = json.loads(resp.read())["configs"]
    hcm = listeners[0]["active_state"]["listener"]["filter_chains"][0]["filters"][0]
    tracing = hcm["typed_config"]["tracing"]
    assert tracing["provider"]["name"] == "envoy.tracers.opentelemetry"
    otel = tracing["provider"]["typed_config"]
    assert otel["grpc_service"]["envoy_grpc"]["cluster_name"] == "legation|tracing"
    assert otel["service_name"] == "ingress"
    assert tracing["random_sampling"]["value"] == 100
    url = f"http://127.0.0.1:{world.p['gwa']}/config_dump?resource=dynamic_route_configs"
    with urllib.request.urlopen(url, timeout=5) as resp:
        routes = json.loads(resp.read())["configs"][0]["route_config"]
    by_route = {r["name"]: r for r in routes["virtual_hosts"][0]["routes"]}
    assert by_route["half"]["tracing"]["random_sampling"] == {
        "numerator": 5000,
        "denominator": "TEN_THOUSAND",
    }
    assert "tracing" not in by_route["front"]


def test_legation_traces_prints_the_waterfall(world: World) -> None:
    trace_id = trace_id_of(world.get("/admin?call=reviews", {"x-role": "admin"}))
    world.wait_trace(trace_id, spans=10)
    url = f"http://127.0.0.1:{world.cp.status_port}"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "legation.cli", "traces", "--url", url]
    out = subprocess.run(
        [*cmd, "--id", trace_id], capture_output=True, text=True, timeout=30, env=env
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith(f"trace {trace_id}  ")
    check = next(line for line in lines if "legation.extauthz check" in line)
    gateway = next(line for line in lines if "ingress: ingress" in line)
    # indented by depth: the check under the gateway's call-out span under the gateway span
    assert check.index("legation-extauthz") - gateway.index("ingress: ingress") == 4
    assert "decision=allow policy=trace.authz" in check
    doc = json.loads(
        subprocess.run(
            [*cmd, "--route", "admin", "--json", "--limit", "1"],
            capture_output=True,
            text=True,
            timeout=30,
            env=env,
            check=True,
        ).stdout
    )
    assert len(doc["traces"]) == 1
    bad = subprocess.run(
        [*cmd, "--id", "not-hex"], capture_output=True, text=True, timeout=30, env=env
    )
    assert bad.returncode == 1
    assert "id: expected a trace id (32 hex digits)" in bad.stderr
    status = subprocess.run(
        [sys.executable, "-m", "legation.cli", "status", "--url", url],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
        check=True,
    ).stdout
    assert f"tracing  embedded at 127.0.0.1:{world.p['col']} over mTLS, sampling 100 %, " in status


def test_every_proxy_exports_over_mtls_pinned_to_the_receivers_identity(world: World) -> None:
    trace_id = trace_id_of(world.get("/admin?call=reviews", {"x-role": "admin"}))
    assert len(world.wait_trace(trace_id, spans=10)) >= 10
    prefix = "cluster.legation|tracing."
    for node, envoy in world.envoys.items():
        stats = envoy.stats(rf"^{re.escape(prefix)}(ssl\.handshake|ssl\.connection_error)$")
        assert stats.get(prefix + "ssl.handshake", 0) >= 1, (node, stats)
        assert stats.get(prefix + "ssl.connection_error", 0) == 0, (node, stats)
    dump = world.envoys["gateway-ingress"].config_dump("dynamic_active_clusters")
    (cluster,) = [
        c["cluster"] for c in dump["configs"] if c["cluster"]["name"] == "legation|tracing"
    ]
    context = cluster["transport_socket"]["typed_config"]["common_tls_context"]
    validation = context["combined_validation_context"]["default_validation_context"]
    assert validation["match_typed_subject_alt_names"][0]["matcher"] == {
        "exact": "spiffe://cluster.local/ns/default/sa/legation-tracing"
    }
    assert context["alpn_protocols"] == ["h2"]
    assert world.status()["tracing"]["tls"] == "mesh"


def test_outsiders_cannot_export_and_a_workload_only_under_its_own_name(
    world: World, tmp_path: Path
) -> None:
    port, bundle = world.p["col"], world.cp.issuer.bundle_pem
    front = next(c for n, c in world.cp.issuer.certs.items() if "frontend" in n)
    other_ca = CertificateAuthority.in_directory(tmp_path / "other", trust_domain="cluster.local")
    forged = other_ca.issue(front.spiffe_id, ttl=timedelta(hours=1))
    assert world.cp.xds_ca is not None
    xds_credential = world.cp.xds_ca.issue(front.spiffe_id, ttl=timedelta(hours=1))
    refused_before = world.cp.collector.refused
    attempts = {
        0xA77AC1: export_one(port, 0xA77AC1, service="frontend"),  # plaintext
        0xA77AC2: export_one(port, 0xA77AC2, service="frontend", cert=forged, trusted=bundle),
        0xA77AC3: export_one(
            port, 0xA77AC3, service="frontend", cert=xds_credential, trusted=bundle
        ),
        0xA77AC4: export_one(port, 0xA77AC4, service="ingress", cert=front, trusted=bundle),
        0xA77AC5: export_one(
            port, 0xA77AC5, service="legation-extauthz", cert=front, trusted=bundle
        ),
    }
    assert attempts == {
        0xA77AC1: grpc.StatusCode.UNAVAILABLE,  # no TLS: no handshake
        0xA77AC2: grpc.StatusCode.UNAVAILABLE,  # the handshake refuses the foreign chain
        0xA77AC3: grpc.StatusCode.UNAVAILABLE,  # the xDS root is no mesh root
        0xA77AC4: grpc.StatusCode.PERMISSION_DENIED,  # frontend's certificate as the gateway
        0xA77AC5: grpc.StatusCode.PERMISSION_DENIED,  # ... or as a Legation service
    }
    assert world.cp.collector.refused == refused_before + 2
    # the same certificate under its own name is served: the clients above were well formed
    assert export_one(port, 0xA77AC6, service="frontend", cert=front, trusted=bundle) == (
        grpc.StatusCode.OK
    )
    stored = {t["trace_id"] for t in world.traces("limit=1000")["traces"]}
    assert f"{0xA77AC6:032x}" in stored
    assert not {f"{t:032x}" for t in attempts} & stored
    for t in attempts:
        assert world.traces(f"id={t:032x}")["traces"] == []
