"""`legation up` runs each request-path service in several worker processes, and the real Envoy
spreads the calls over them (one endpoint per worker, worker i on ``port + 100 i``): every worker's
own counter (``worker`` label on the control plane's /metrics) shows decisions. A worker killed is
started again; while none answers, the route fails closed. Rate limits stay exact: the memory
backend runs one worker, the Redis one shares its counters between workers."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import pytest

from tests.conftest import free_port, worker_base_port
from tests.integration.test_up import Up, eventually, http, processes
from tests.ratelimit.conftest import RedisServer, needs_redis

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
MESH = """\
xds: {{host: 127.0.0.1, port: {xds}}}
gateway: {{name: gw, host: 127.0.0.1, port: {gw}, admin_port: {gw_admin}}}
extauthz: {{port: {authz}, config: authz.yaml, workers: 2}}
ratelimit: {{port: {rl}, config: limits.yaml, domain: mesh{rl_store}}}
services:
  - name: web
    port: 9080
    endpoints: [{{port: {app}, demo: {{}}}}]
routes:
  - name: admin
    match: {{path: {{prefix: /admin}}}}
    to: {{service: web}}
    authz: quickstart.authz
  - name: limited
    match: {{path: {{prefix: /limited}}}}
    to: {{service: web}}
    rate_limits:
      - actions: [{{generic_key: {{value: limited}}}}]
"""
LIMITS = """\
domain: mesh
descriptors:
  - {key: generic_key, value: limited, rate_limit: {unit: minute, requests_per_unit: 5}}
"""


def _start(tmp: Path, *, rl_store: str = "", rl_workers: int = 1) -> tuple[Up, dict[str, int]]:
    (tmp / "authz.yaml").write_text(
        f"checks: {{rego: {{type: rego, options: {{policy_dir: {REPO / 'policies/quickstart'}}}}}}}"
        "\ndefault_checks: [rego]\n"
    )
    (tmp / "limits.yaml").write_text(LIMITS)
    ports = {n: free_port() for n in ("xds", "gw", "gw_admin", "app", "status")}
    ports |= {"authz": worker_base_port(2), "rl": worker_base_port(rl_workers)}
    mesh = tmp / "mesh.yaml"
    mesh.write_text(MESH.format(**ports, rl_store=rl_store))
    run = Up(mesh, tmp, ports["status"])
    run.wait_for("Legation is up")
    return run, ports


def _decisions(status_url: str) -> dict[str, float]:
    """ext_authz decisions per worker, from the control plane's merged /metrics."""
    _, text = http(status_url + "/metrics")
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("legation_extauthz_decisions_total{"):
            worker = re.search(r'worker="(\d+)"', line)
            assert worker is not None, line
            out[worker.group(1)] = out.get(worker.group(1), 0) + float(line.rsplit(" ", 1)[1])
    return out


def _workers(status_url: str, role: str) -> dict[int, dict[str, object]]:
    return {int(p["worker"]): p for p in processes(status_url) if p["role"] == role}


def test_calls_spread_over_the_workers_and_a_dead_one_is_restarted(tmp_path: Path) -> None:
    run, ports = _start(tmp_path)
    try:
        gw = f"http://127.0.0.1:{ports['gw']}"
        assert run.proc.poll() is None
        eventually(lambda: len(_workers(run.status_url, "extauthz")) == 2)
        workers = _workers(run.status_url, "extauthz")
        assert {w["name"] for w in workers.values()} == {"extauthz/0", "extauthz/1"}
        assert len({w["pid"] for w in workers.values()}) == 2

        for _ in range(20):  # decided by both workers: the policy's answer every time
            assert http(gw + "/admin", {"x-role": "admin"})[0] == 200
            assert http(gw + "/admin")[0] == 403
        counts = _decisions(run.status_url)
        assert set(counts) == {"0", "1"} and min(counts.values()) >= 10, counts

        # worker 0 killed: Envoy takes it out of the round robin at its first refused
        # connection (that call fails closed), worker 1 decides the rest; `legation up` starts
        # worker 0 again
        os.kill(int(str(workers[0]["pid"])), signal.SIGKILL)
        answers = [http(gw + "/admin", {"x-role": "admin"})[0] for _ in range(12)]
        assert answers.count(403) <= 1 and answers.count(200) == len(answers) - answers.count(403)
        assert http(gw + "/admin")[0] == 403
        run.wait_for("extauthz/0 restarted")
        eventually(lambda: _workers(run.status_url, "extauthz")[0]["restarts"] == 1)
        eventually(
            lambda: all(http(gw + "/admin", {"x-role": "admin"})[0] == 200 for _ in range(6))
        )

        # both killed: nobody answers, ext_authz fails closed (never a 200) until they are back
        for worker in _workers(run.status_url, "extauthz").values():
            os.kill(int(str(worker["pid"])), signal.SIGKILL)
        answers = [http(gw + "/admin", {"x-role": "admin"})[0] for _ in range(5)]
        assert 200 not in answers, answers
        eventually(lambda: http(gw + "/admin", {"x-role": "admin"})[0] == 200, timeout=20)
        assert http(gw + "/admin")[0] == 403

        # the memory rate limiter: one worker, 5 a minute exactly
        assert len(_workers(run.status_url, "ratelimit")) == 1
        allowed = [http(gw + "/limited")[0] for _ in range(12)].count(200)
        assert allowed == 5
    finally:
        run.stop()


@needs_redis
def test_redis_rate_limit_stays_exact_across_workers(tmp_path: Path) -> None:
    redis = RedisServer(tmp_path)
    try:
        run, ports = _start(
            tmp_path,
            rl_store=f", backend: redis, redis_url: '{redis.url}', workers: 2",
            rl_workers=2,
        )
        try:
            gw = f"http://127.0.0.1:{ports['gw']}"
            assert len(_workers(run.status_url, "ratelimit")) == 2
            allowed = [http(gw + "/limited")[0] for _ in range(12)].count(200)
            assert allowed == 5
        finally:
            run.stop()
    finally:
        redis.stop()


EXTPROC_HTTP_MESH = """\
xds: {{host: 127.0.0.1, port: {xds}}}
gateway: {{name: gw, host: 127.0.0.1, port: {gw}, admin_port: {gw_admin}}}
extproc: {{port: {proc}, protocol: http, http_port: {proc_http}, workers: 2, timeout: 1s}}
services:
  - name: web
    port: 9080
    endpoints: [{{port: {app}, demo: {{}}}}]
routes:
  - name: cohort
    match: {{path: {{prefix: /}}}}
    to: {{service: web}}
    filters:
      - name: header_route
        options: {{header: x-legation-cohort, rules: [{{header: x-beta, present: true, value: b}}]}}
"""


def test_ext_proc_over_http_is_served_by_every_worker(tmp_path: Path) -> None:
    """`extproc: {protocol: http}` in `legation up`: each worker process serves the HTTP
    transport on http_port + 100 i, and Envoy's calls reach both."""
    ports = {n: free_port() for n in ("xds", "gw", "gw_admin", "app", "status")}
    ports |= {"proc": worker_base_port(2), "proc_http": worker_base_port(2)}
    mesh = tmp_path / "mesh.yaml"
    mesh.write_text(EXTPROC_HTTP_MESH.format(**ports))
    run = Up(mesh, tmp_path, ports["status"])
    try:
        run.wait_for("Legation is up")
        eventually(lambda: len(_workers(run.status_url, "extproc")) == 2)
        gw = f"http://127.0.0.1:{ports['gw']}"
        for _ in range(20):
            status, body = http(gw + "/", {"x-beta": "1"})
            assert status == 200 and '"x-legation-cohort": "b"' in body, body
        _, text = http(run.status_url + "/metrics")
        phases: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith("legation_extproc_phases_total{") and 'chain="cohort"' in line:
                worker = re.search(r'worker="(\d+)"', line)
                assert worker is not None, line
                phases[worker.group(1)] = float(line.rsplit(" ", 1)[1])
        assert set(phases) == {"0", "1"} and sum(phases.values()) >= 20, phases
    finally:
        run.stop()
