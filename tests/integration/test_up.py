"""`legation up` as a user runs it: a subprocess, real Envoys, demo apps, reload, clean stops."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MESH = """\
xds: {{host: 127.0.0.1, port: {xds}}}
gateway: {{name: gw, host: 127.0.0.1, port: {gw}, admin_port: {gw_admin}}}
services:
  - name: web
    port: 9080
    subsets:
      - {{name: v1, labels: {{version: v1}}}}
      - {{name: v2, labels: {{version: v2}}}}
    endpoints:
      - {{name: web-v1, port: {app1}, labels: {{version: v1}}, demo: {{}},
         sidecar: {{inbound_port: {in1}, outbound_port: {out1}, admin_port: {admin1}}}}}
      - {{name: web-v2, port: {app2}, labels: {{version: v2}}, demo: {{}}}}
routes:
  - name: hello
    match: {{path: {{exact: /hello}}}}
    direct_response: {{status: 200, body: "{greeting}"}}
  - name: web
    match: {{path: {{prefix: /}}}}
    to: {{service: web, subset: {subset}}}
"""


class Up:
    """A `legation up` subprocess whose output is collected line by line."""

    def __init__(
        self,
        mesh: Path,
        tmp: Path,
        status_port: int,
        *,
        terminal: bool = False,
        flags: Sequence[str] = (),
    ) -> None:
        self.log_dir = tmp / "logs"
        self.status_url = f"http://127.0.0.1:{status_port}"
        command = [
            sys.executable,
            "-m",
            "legation.cli",
            "up",
            str(mesh),
            "--status-port",
            str(status_port),
            "--log-dir",
            str(self.log_dir),
            *flags,
        ]
        if terminal:  # util-linux `script` gives the command a pseudo-terminal
            command = ["script", "-qfec", " ".join(command), "/dev/null"]
        else:
            command.append("--plain")
        self.proc = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, text: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.output:
                return
            if self.proc.poll() is not None:
                time.sleep(0.2)
                if text in self.output:
                    return
                raise AssertionError(f"legation up exited ({self.proc.returncode}):\n{self.output}")
            time.sleep(0.05)
        raise AssertionError(f"{text!r} not seen in {timeout}s:\n{self.output}")

    def envoy_pids(self) -> list[int]:
        """Envoy processes whose config lives in this run's log dir."""
        out = subprocess.run(
            ["pgrep", "-f", f"envoy.*{self.log_dir}"], capture_output=True, text=True
        ).stdout
        return [int(pid) for pid in out.split()]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self._reader.join(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def http(url: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0, ""


def processes(status_url: str) -> list[dict[str, Any]]:
    """``processes`` of the status document ([] while the control plane is away)."""
    status, body = http(status_url + "/status")
    return list(json.loads(body)["processes"]) if status == 200 else []


def eventually(check: Any, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError("condition not met in time")


def gone(pids: list[int], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [
            p
            for p in pids
            if Path(f"/proc/{p}").exists()
            and "zombie" not in Path(f"/proc/{p}/status").read_text().lower()
        ]
        if not alive:
            return True
        time.sleep(0.1)
    return False


@pytest.fixture
def ports() -> dict[str, int]:
    names = ["xds", "gw", "gw_admin", "app1", "app2", "in1", "out1", "admin1", "status"]
    chosen: dict[str, int] = {}
    while len(chosen) < len(names):
        p = free_port()
        if p not in chosen.values():
            chosen[names[len(chosen)]] = p
    return chosen


@pytest.fixture
def mesh_file(tmp_path: Path, ports: dict[str, int]) -> Path:
    path = tmp_path / "mesh.yaml"
    path.write_text(MESH.format(**ports, greeting="hello v1", subset="v1"))
    return path


@pytest.fixture
def up(mesh_file: Path, tmp_path: Path, ports: dict[str, int]) -> Iterator[Up]:
    run = Up(mesh_file, tmp_path, ports["status"])
    yield run
    run.stop()


def test_up_serves_reloads_reports_and_stops_cleanly(
    up: Up, mesh_file: Path, ports: dict[str, int]
) -> None:
    up.wait_for("Legation is up")
    gw = f"http://127.0.0.1:{ports['gw']}"
    assert f"curl -s {gw}/hello" in up.output  # it tells you where to send requests
    assert http(gw + "/hello") == (200, "hello v1")
    status, body = http(gw + "/anything")
    assert status == 200 and json.loads(body)["version"] == "v1"

    # legation status, human and JSON
    cli = [sys.executable, "-m", "legation.cli", "status", "--url", up.status_url]
    human = subprocess.run(cli, capture_output=True, text=True, timeout=30)
    assert human.returncode == 0, human.stderr
    assert "gateway-gw  (gateway, in sync)" in human.stdout
    assert "sidecar-web-v1  (sidecar, in sync)" in human.stdout
    assert f"admin      127.0.0.1:{ports['admin1']}" in human.stdout
    doc = json.loads(
        subprocess.run([*cli, "--json"], capture_output=True, text=True, timeout=30).stdout
    )
    gateway = next(p for p in doc["proxies"] if p["node_id"] == "gateway-gw")
    assert gateway["listeners"] == {"gateway": f"127.0.0.1:{ports['gw']}"}
    assert set(gateway["acked"]) >= {"CDS", "EDS", "LDS", "RDS"}
    assert gateway["last_nack"] is None

    # a valid change reaches the running Envoys, without restarting them
    pids = up.envoy_pids()
    mesh_file.write_text(
        mesh_file.read_text().replace("hello v1", "hello v2").replace("subset: v1}", "subset: v2}")
    )
    eventually(lambda: http(gw + "/hello") == (200, "hello v2"))
    eventually(lambda: json.loads(http(gw + "/x")[1] or "{}").get("version") == "v2")
    assert sorted(up.envoy_pids()) == sorted(pids)
    up.wait_for("mesh reloaded: generation 2")

    # an invalid change is printed and counted; the running config is untouched
    good = mesh_file.read_text()
    mesh_file.write_text(good.replace("routes:", "routez:"))
    up.wait_for("mesh change rejected, still serving generation 2")
    assert f"{mesh_file}: routez: " in up.output  # the error names the file and the field
    for _ in range(10):
        assert http(gw + "/hello") == (200, "hello v2")
    doc = json.loads(
        subprocess.run([*cli, "--json"], capture_output=True, text=True, timeout=30).stdout
    )
    assert doc["generation"] == 2 and "routez" in doc["last_error"]
    metrics = http(up.status_url + "/metrics")[1]
    assert 'legation_config_reloads_total{result="rejected"} 1.0' in metrics

    # Ctrl-C stops everything: no Envoy left behind
    up.proc.send_signal(signal.SIGINT)
    assert up.proc.wait(20) == 0
    assert gone(pids), f"Envoys left running: {up.envoy_pids()}"


def test_a_dead_proxy_is_restarted_and_serves_again(up: Up, ports: dict[str, int]) -> None:
    up.wait_for("Legation is up")
    gw = f"http://127.0.0.1:{ports['gw']}"
    pids = up.envoy_pids()
    assert len(pids) == 2  # the gateway and web-v1's sidecar
    for pid in pids:  # the gateway and the sidecar, each killed once
        os.kill(pid, signal.SIGKILL)
    up.wait_for("restarted (pid", timeout=30)
    eventually(lambda: len(set(up.envoy_pids()) - set(pids)) == 2, timeout=30)
    assert up.proc.poll() is None  # legation up kept running
    assert "exited (code -9); restarting it in" in up.output
    eventually(lambda: http(gw + "/hello") == (200, "hello v1"), timeout=30)
    eventually(lambda: http(gw + "/")[0] == 200, timeout=30)  # through the restarted sidecar
    envoys = [p for p in processes(up.status_url) if p["role"] == "envoy"]
    assert len(envoys) == 2 and all(p["alive"] and p["restarts"] == 1 for p in envoys)
    assert gone(pids)


def test_envoys_die_with_a_killed_legation_up(up: Up) -> None:
    up.wait_for("Legation is up")
    pids = up.envoy_pids()
    up.proc.kill()  # SIGKILL: no clean-up code runs; PR_SET_PDEATHSIG does the job
    up.proc.wait(10)
    assert gone(pids), f"orphaned Envoys: {up.envoy_pids()}"


def test_up_refuses_an_invalid_mesh(tmp_path: Path, ports: dict[str, int]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(MESH.format(**ports, greeting="x", subset="v9"))
    run = Up(bad, tmp_path, ports["status"])
    try:
        assert run.proc.wait(30) == 2
        run._reader.join(5)
        assert "invalid mesh, nothing started" in run.output
        assert f"{bad}: routes[1].to.subset: " in run.output
        assert run.envoy_pids() == []
    finally:
        run.stop()


SERVICES = """\
extauthz: {{port: {authz}, config: authz.yaml}}
ratelimit: {{port: {rl}, config: limits.yaml}}
accesslog: {{port: {als}, flush_interval: 100ms}}
tracing: {{port: {traces}}}
mtls: {{mode: strict, ca_dir: ca}}
"""


def test_up_runs_the_mesh_services_and_stops_them(tmp_path: Path, ports: dict[str, int]) -> None:
    repo = Path(__file__).resolve().parents[2]
    (tmp_path / "authz.yaml").write_text(
        f"checks: {{rego: {{type: rego, options: {{policy_dir: {repo / 'policies/quickstart'}}}}}}}"
        "\ndefault_checks: [rego]\n"
    )
    (tmp_path / "limits.yaml").write_text("domain: mesh\ndescriptors: []\n")
    service_ports = {
        "authz": free_port(),
        "rl": free_port(),
        "als": free_port(),
        "traces": free_port(),
    }
    mesh = tmp_path / "mesh.yaml"
    mesh.write_text(
        SERVICES.format(**service_ports)
        + MESH.format(**ports, greeting="hi", subset="v1").replace(
            "    to: {service: web, subset: v1}",
            "    to: {service: web, subset: v1}\n    authz: quickstart.authz",
        )
    )
    run = Up(mesh, tmp_path, ports["status"])
    try:
        run.wait_for("Legation is up")
        assert (
            f"extauthz service at 127.0.0.1:{service_ports['authz']}, in its own process"
            in run.output
        )
        gw = f"http://127.0.0.1:{ports['gw']}"
        status, body = http(gw + "/page")
        assert status == 403 and json.loads(body)["policy"] == "quickstart.authz"
        assert http(gw + "/page", {"x-role": "admin"})[0] == 200
        assert http(gw + "/hello") == (200, "hi")  # no authz on that route

        def routes() -> dict[str, int]:
            golden = json.loads(http(run.status_url + "/status")[1])["golden"]
            return {r["labels"]["route"]: r["total"] for r in golden["scopes"]["route"]}

        # golden metrics from the access-log service's own process, through its /metrics
        eventually(lambda: routes() == {"web": 2, "hello": 1})

        # traces: the extauthz workers (their own processes, following their plan) record a span
        # per check under the gateway's, into the control plane's embedded receiver, over mTLS
        # (strict mesh) with the certificate files of their plan
        def checks() -> list[dict[str, Any]]:
            doc = json.loads(http(run.status_url + "/traces?route=web")[1])
            spans = [s for t in doc["traces"] for s in t["spans"]]
            return [s for s in spans if s["service"] == "legation-extauthz"]

        eventually(lambda: len(checks()) == 2, timeout=20)  # Envoy flushes every 5 s
        assert sorted(s["attributes"]["legation.decision"] for s in checks()) == ["allow", "deny"]
        doc = json.loads(http(run.status_url + "/status")[1])
        assert (doc["tracing"]["tls"], doc["tracing"]["refused"]) == ("mesh", 0)
        assert doc["services"]["ratelimit"] == {
            "embedded": True,
            "address": f"127.0.0.1:{service_ports['rl']}",
            "tls": "mesh",
            "process": "own",
            "workers": 1,  # the memory backend counts in one process
            "plan": str(Path(".legation/services/ratelimit/plan.json").resolve()),
        }
        cores = min(8, len(os.sched_getaffinity(0)))
        assert doc["services"]["extauthz"]["workers"] == cores
        eventually(
            lambda: (
                {p["role"] for p in processes(run.status_url)}
                >= {"up", "xds", "extauthz", "ratelimit", "envoy"}
            )
        )
        roles = {p["role"]: p for p in processes(run.status_url)}

        # the control plane killed: the services (their own processes) keep deciding, and it is
        # started again by `legation up`, counted
        os.kill(roles["xds"]["pid"], signal.SIGKILL)
        for _ in range(10):
            assert http(gw + "/page")[0] == 403
            assert http(gw + "/page", {"x-role": "admin"})[0] == 200
        run.wait_for("xds restarted")
        eventually(
            lambda: any(
                p["role"] == "xds" and p["restarts"] == 1 for p in processes(run.status_url)
            )
        )
        # a service process killed is started again with its last good config
        os.kill(roles["extauthz"]["pid"], signal.SIGKILL)
        run.wait_for(f"extauthz/{roles['extauthz']['worker']} restarted")
        eventually(lambda: http(gw + "/page", {"x-role": "admin"})[0] == 200)
        assert http(gw + "/page")[0] == 403

        # a reload that drops a service stops its process
        mesh.write_text(
            mesh.read_text().replace(SERVICES.format(**service_ports).splitlines()[1] + "\n", "")
        )
        run.wait_for("ratelimit/0 gone from the mesh, its process stopped")
        eventually(lambda: "ratelimit" not in {p["role"] for p in processes(run.status_url)})
        run.proc.send_signal(signal.SIGINT)
        assert run.proc.wait(20) == 0
        for port in service_ports.values():  # the services stopped with it (or before)
            with socket.socket() as s:
                assert s.connect_ex(("127.0.0.1", port)) != 0
    finally:
        run.stop()


def test_up_refuses_to_start_when_a_service_port_is_taken(
    tmp_path: Path, ports: dict[str, int]
) -> None:
    (tmp_path / "limits.yaml").write_text("domain: mesh\ndescriptors: []\n")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        mesh = tmp_path / "mesh.yaml"
        mesh.write_text(
            f"ratelimit: {{port: {port}, config: limits.yaml}}\n"
            + MESH.format(**ports, greeting="hi", subset="v1")
        )
        run = Up(mesh, tmp_path, ports["status"])
        try:
            assert run.proc.wait(30) == 1
            run._reader.join(5)
            assert "cannot start the mesh's request-path services, nothing started" in run.output
            assert f"cannot start the embedded ratelimit service on 127.0.0.1:{port}" in run.output
            assert run.envoy_pids() == []
        finally:
            run.stop()


def test_up_on_a_terminal_shows_a_live_table(
    mesh_file: Path, tmp_path: Path, ports: dict[str, int]
) -> None:
    run = Up(mesh_file, tmp_path, ports["status"], terminal=True)
    try:
        run.wait_for("recent (all of it in")  # the table, with the latest log lines under it
        gw = f"http://127.0.0.1:{ports['gw']}"
        for _ in range(5):
            assert http(gw + "/hello") == (200, "hello v1")
        eventually(
            lambda: (
                "gateway-gw" in (screen := run.output.rsplit("\x1b[H\x1b[J", 1)[-1])
                and " 5 " in screen.split("gateway-gw", 1)[1].splitlines()[0]
            )
        )
        screen = run.output.rsplit("\x1b[H\x1b[J", 1)[-1]
        assert f"curl -s {gw}/hello" in screen  # the banner stays on screen
        assert "sidecar-web-v1" in screen and "yes" in screen
        assert (run.log_dir / "legation.log").read_text().count("connected") >= 2
        run.proc.send_signal(signal.SIGINT)
        assert run.proc.wait(20) == 0
    finally:
        run.stop()
