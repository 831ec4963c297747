"""The mesh's request-path services, embedded in the control plane, called by real Envoys.

One control plane (with its embedded ext_authz, ext_proc and rate-limit services) serves a gateway
and one sidecar over ADS, on free ports. A Rego policy allows and denies; routes without ``authz``
make no ext_authz call; a header_route filter picks a cohort; a limit answers 429; a mesh reload
swaps the ext_proc chains; with the ext_authz service gone, Envoy denies (fail closed). All of it
twice: with the mesh's mTLS off, and strict (the services then serve mTLS to the proxies).
"""

from __future__ import annotations

import json
import re
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from legation.demo import DemoApp
from tests.conftest import distinct_ports
from tests.envoy_stack import MeshWorld

pytestmark = [pytest.mark.integration, pytest.mark.slow]

T = TypeVar("T")
REPO = Path(__file__).resolve().parents[2]

AUTHZ_YAML = f"""\
checks:
  rego: {{type: rego, options: {{policy_dir: {REPO / "policies" / "quickstart"}}}}}
default_checks: [rego]
"""

RATELIMIT_YAML = """\
domain: test
descriptors:
  - key: generic_key
    value: limited
    descriptors:
      - key: user
        rate_limit: {unit: minute, requests_per_unit: 3}
"""

MESH = """\
xds: {{port: {xds}}}
mtls: {{mode: {mtls}, ca_dir: ca, cert_ttl: 1h}}
gateway: {{name: gw, port: {gw}, admin_port: {gw_admin}}}
extauthz: {{port: {authz}, config: authz.yaml}}
extproc: {{port: {proc}}}
ratelimit: {{port: {rl}, config: limits.yaml, domain: test, failure_mode: closed}}
accesslog: {{port: {als}, flush_interval: 100ms}}
services:
  - name: web
    port: 9080
    subsets:
      - {{name: v1, labels: {{version: v1}}}}
      - {{name: v2, labels: {{version: v2}}}}
    endpoints:
      - {{name: web-v1, port: {app1}, labels: {{version: v1}},
         sidecar: {{inbound_port: {in1}, outbound_port: {out1}, admin_port: {admin1}}}}}
      - {{name: web-v2, port: {app2}, labels: {{version: v2}}}}
routes:
  - name: admin
    gateway: true
    mesh_hosts: [web]
    match: {{path: {{prefix: /admin}}}}
    to: {{service: web, subset: v1}}
    authz: quickstart.authz
  - name: beta
    match: {{path: {{prefix: /cohort}}, headers: [{{name: x-cohort, exact: beta}}]}}
    to: {{service: web, subset: v2}}
    filters: &cohort
      - name: header_route
        options: {{header: x-cohort, rules: [{{header: x-user, one_of: [alice], value: beta}}]}}
  - name: cohort
    match: {{path: {{prefix: /cohort}}}}
    to: {{service: web, subset: v1}}
    filters: *cohort
  - name: tagged
    match: {{path: {{prefix: /tagged}}}}
    to: {{service: web, subset: v1}}
    filters: [{{name: headers, options: {{request: {{set: {{x-tag: {tag}}}}}}}}}]
  - name: limited
    match: {{path: {{prefix: /limited}}}}
    to: {{service: web, subset: v1}}
    rate_limits:
      - actions:
          - {{generic_key: {{value: limited}}}}
          - {{request_headers: {{header: x-user, key: user}}}}
  - name: open
    match: {{path: {{prefix: /}}}}
    to: {{service: web, subset: v1}}
"""


def http(
    port: int, path: str, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], str]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            headers = {k.lower(): v for k, v in resp.headers.items()}
            return resp.status, headers, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, {k.lower(): v for k, v in err.headers.items()}, err.read().decode()


class World(MeshWorld):
    def __init__(self, tmp: Path, mtls: str = "off") -> None:
        self.mtls = mtls
        self.apps = {v: DemoApp(name="web", version=v).start_in_thread() for v in ("v1", "v2")}
        self.ports = distinct_ports(
            "xds", "gw", "gw_admin", "authz", "proc", "rl", "als", "in1", "out1", "admin1", "status"
        )
        (tmp / "authz.yaml").write_text(AUTHZ_YAML)
        (tmp / "limits.yaml").write_text(RATELIMIT_YAML)
        self.mesh_path = tmp / "mesh.yaml"
        self.write_mesh(tag="one")
        super().__init__(tmp, self.mesh_path, status_port=self.ports["status"])

    def write_mesh(self, *, tag: str) -> None:
        self.mesh_path.write_text(
            MESH.format(
                **self.ports,
                app1=self.apps["v1"].port,
                app2=self.apps["v2"].port,
                tag=tag,
                mtls=self.mtls,
            )
        )

    def gateway(
        self, path: str, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], str]:
        return http(self.ports["gw"], path, headers)

    def metric(self, name: str, **labels: str) -> float:
        """The sum of a service metric's samples with these labels, from the control plane's
        /metrics (where the embedded services' registries are served)."""
        _, _, text = http(self.cp.status_port, "/metrics")
        total = 0.0
        for line in text.splitlines():
            m = re.match(rf"^{name}(?:{{(.*)}})? (\S+)$", line)
            if m and all(f'{k}="{v}"' in (m.group(1) or "") for k, v in labels.items()):
                total += float(m.group(2))
        return total

    def golden_proxies(self) -> list[dict[str, Any]]:
        golden = self.cp.services.golden()
        return golden["scopes"]["proxy"] if golden else []

    def close(self) -> None:
        super().close()
        for app in self.apps.values():
            app.stop_thread()


@pytest.fixture(scope="module", params=["off", "strict"], ids=["plaintext", "mtls-strict"])
def world(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[World]:
    """The whole module runs twice: without mTLS (the services speak plaintext gRPC) and with
    strict mTLS (every proxy calls the services over mTLS with its workload certificate, and the
    services accept nothing else)."""
    w = World(tmp_path_factory.mktemp("mesh-services"), mtls=request.param)
    try:
        w.start()
        yield w
    finally:
        w.close()


def test_policy_allows_and_denies_with_a_body(world: World) -> None:
    status, headers, body = world.gateway("/admin", {"x-role": "admin"})
    assert status == 200
    assert json.loads(body)["headers"]["x-legation-role"] == "admin"  # the policy's header
    assert headers["x-legation-policy"] == "quickstart.authz"
    status, headers, body = world.gateway("/admin", {"x-role": "viewer", "x-other": "1"})
    assert status == 200  # viewers may read
    status, headers, body = world.gateway("/admin")
    assert status == 403
    assert json.loads(body) == {"error": "forbidden", "policy": "quickstart.authz"}


@pytest.mark.parametrize("path", ["//admin", "///admin/x", "/x/../admin", "/./admin"])
def test_other_spellings_of_a_protected_path_meet_the_same_policy(world: World, path: str) -> None:
    """Envoy normalises the path (the mesh default, merge_slashes) before it routes, so another
    spelling of /admin cannot fall through to the catch-all route that has no policy."""
    status, _, body = world.gateway(path)
    assert status == 403, (path, body)
    assert json.loads(body) == {"error": "forbidden", "policy": "quickstart.authz"}
    assert world.gateway(path, {"x-role": "admin"})[0] == 200


def test_sidecar_outbound_enforces_the_policy_too(world: World) -> None:
    out = world.ports["out1"]
    assert http(out, "/admin", {"host": "web"})[0] == 403
    assert http(out, "/admin", {"host": "web", "x-role": "admin"})[0] == 200
    assert http(out, "/anything", {"host": "web"})[0] == 200  # default route: no check


def test_route_without_authz_makes_no_ext_authz_call(world: World) -> None:
    decisions = world.metric("legation_extauthz_decisions_total")
    stats_key = "http.gateway_gw.ext_authz"
    before = world.envoys["gateway-gw"].stats(rf"^{re.escape(stats_key)}\.")
    for _ in range(5):
        status, _, body = world.gateway("/open/page")
        assert status == 200 and json.loads(body)["version"] == "v1"
    assert world.metric("legation_extauthz_decisions_total") == decisions
    assert world.envoys["gateway-gw"].stats(rf"^{re.escape(stats_key)}\.") == before
    world.gateway("/admin", {"x-role": "admin"})  # the same counters do move on a checked route
    assert world.metric("legation_extauthz_decisions_total") == decisions + 1


def test_filter_plugin_picks_the_cohort(world: World) -> None:
    for _ in range(3):
        status, _, body = world.gateway("/cohort", {"x-user": "alice"})
        assert status == 200
        answer = json.loads(body)
        assert answer["version"] == "v2"
        assert answer["headers"]["x-cohort"] == "beta"
    # not in the cohort, and a client-sent cohort header is not trusted
    status, _, body = world.gateway("/cohort", {"x-user": "carol", "x-cohort": "beta"})
    assert status == 200
    answer = json.loads(body)
    assert answer["version"] == "v1" and "x-cohort" not in answer["headers"]
    assert world.metric("legation_extproc_streams_total", chain="cohort") >= 1


def test_limit_answers_429_after_three(world: World) -> None:
    user = {"x-user": f"user-{time.monotonic_ns()}"}
    codes = [world.gateway("/limited", user)[0] for _ in range(3)]
    assert codes == [200, 200, 200]
    status, headers, _ = world.gateway("/limited", user)
    assert status == 429
    assert headers["x-ratelimit-limit"].startswith("3")
    assert headers["x-ratelimit-remaining"] == "0"
    assert world.gateway("/limited", {"x-user": "someone-else"})[0] == 200


def test_reload_swaps_the_extproc_chains(world: World) -> None:
    assert json.loads(world.gateway("/tagged")[2])["headers"]["x-tag"] == "one"
    world.write_mesh(tag="two")
    assert world.loop.run(world.cp.reload()) is True
    deadline = time.monotonic() + 10
    tag = "one"
    while tag != "two" and time.monotonic() < deadline:
        time.sleep(0.05)
        tag = json.loads(world.gateway("/tagged")[2])["headers"]["x-tag"]
    assert tag == "two"
    assert world.cp.services.status()["extproc"]["embedded"] is True


def test_bad_filter_option_on_reload_is_rejected_and_nothing_changes(world: World) -> None:
    good = world.mesh_path.read_text()
    world.mesh_path.write_text(good.replace("one_of: [alice], value: beta", "one_of: [alice]"))
    try:
        assert world.loop.run(world.cp.reload()) is False
        error = world.cp.last_error or ""
        assert f"{world.mesh_path}: routes[1].filters[0].options.rules[0]" in error
        assert json.loads(world.gateway("/cohort", {"x-user": "alice"})[2])["version"] == "v2"
    finally:
        world.mesh_path.write_text(good)


def test_proxies_reach_the_services_over_mtls_when_the_mesh_is_strict(world: World) -> None:
    """The traffic above went over TLS handshakes with the services iff the mesh is strict."""
    assert world.gateway("/admin", {"x-role": "admin"})[0] == 200
    assert world.gateway("/limited", {"x-user": "handshake"})[0] == 200
    assert json.loads(world.gateway("/tagged")[2])["headers"]["x-tag"]
    gateway = world.envoys["gateway-gw"]
    strict = world.mtls == "strict"
    deadline = time.monotonic() + 10  # the access-log service: entries arrive, golden metrics
    while not any(r["labels"]["proxy"] == "gateway-gw" for r in world.golden_proxies()):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    for kind in ("extauthz", "extproc", "ratelimit", "accesslog"):
        assert world.cp.services.status()[kind]["tls"] == ("mesh" if strict else "none")
        prefix = f"cluster.legation|{kind}."
        stats = gateway.stats(rf"^{re.escape(prefix)}(ssl\.handshake|upstream_cx_total)$")
        assert stats[prefix + "upstream_cx_total"] >= 1, stats
        assert (stats.get(prefix + "ssl.handshake", 0) >= 1) is strict, stats
    # with mTLS the access-log service checked each stream's node against its certificate
    als = world.cp.services.running["accesslog"].servicer  # type: ignore[attr-defined]
    assert (als.identities is not None) is strict and als.refused == 0


def _inbound_as(world: World, name: str) -> int | str:
    """An HTTP request to web-1's sidecar inbound over TLS with a mesh certificate for workload
    ``name``: the status, or the TLS/connection error."""
    import ssl
    from datetime import timedelta

    from legation.certs.ca import CertificateAuthority

    ca = CertificateAuthority.in_directory(world.tmp / "ca", trust_domain="cluster.local")
    cert = ca.issue(f"spiffe://cluster.local/ns/default/sa/{name}", ttl=timedelta(hours=1))
    (world.tmp / f"{name}.pem").write_bytes(cert.cert_pem)
    (world.tmp / f"{name}.key").write_bytes(cert.key_pem)
    context = ssl.create_default_context(cadata=ca.root_pem.decode())
    context.check_hostname = False
    context.load_cert_chain(world.tmp / f"{name}.pem", world.tmp / f"{name}.key")
    try:
        with socket.create_connection(("127.0.0.1", world.ports["in1"]), timeout=5) as raw:
            with context.wrap_socket(raw) as tls:
                tls.sendall(b"GET / HTTP/1.1\r\nhost: web\r\nconnection: close\r\n\r\n")
                answer = tls.recv(100)
        return int(answer.split()[1]) if answer else "closed"
    except (ssl.SSLError, OSError) as err:
        return type(err).__name__


def test_a_sidecar_takes_mesh_workloads_not_legations_own_services(world: World) -> None:
    """Legation's service certificates also authenticate as clients (to the trace receiver);
    a sidecar still refuses them as callers: they never call an app."""
    if world.mtls != "strict":  # the inbound speaks plaintext: no TLS peer gets an answer
        assert _inbound_as(world, "gw") != 200
        return
    assert _inbound_as(world, "gw") == 200
    assert _inbound_as(world, "legation-extauthz") != 200


def test_zz_authz_service_gone_means_denials(world: World) -> None:
    """Last in the module: it stops the embedded ext_authz service."""
    assert world.gateway("/admin", {"x-role": "admin"})[0] == 200
    world.loop.run(world.cp.services._stop("extauthz"))
    statuses = [world.gateway("/admin", {"x-role": "admin"})[0] for _ in range(3)]
    assert statuses == [403, 403, 403]
    assert world.gateway("/open")[0] == 200  # routes without authz are unaffected
