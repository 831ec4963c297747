"""``legation up --ebpf`` as a user runs it: real Envoys and demo apps in the run's own cgroup,
traffic through the gateway and a sidecar spliced and intact, nothing left after a stop, and a
crashed run's leftovers removed by the next start; with ``--capture`` too, the pods' sidecars in
the cgroup, an app's call by plain URL redirected at connect time (the sidecar reads its original
destination from the getsockopt program) and traffic through the pods intact. Skipped (the missing
things named) only where root or a kernel feature is missing."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from legation.capture import netns
from legation.capture.ebpf import Sockmap, missing_features
from legation.capture.ebpf._kernel import bpftool
from legation.capture.errors import CaptureError
from legation.config.capture import Capture
from tests.capture.conftest import capture_range
from tests.capture.test_ebpf import programs_gone
from tests.conftest import distinct_ports
from tests.integration.test_up import MESH, Up, gone, http, ports  # noqa: F401 (a fixture)

MISSING = missing_features()
pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(bool(MISSING), reason=f"--ebpf needs: {'; '.join(MISSING)}"),
]


# two services, each an app in its pod with a sidecar; the frontend app calls reviews by plain URL
CAPTURE_MESH = """\
xds: {{host: 127.0.0.1, port: {xds}}}
mtls: {{mode: strict}}
capture: {{cidr: {cidr}}}
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
routes:
  - name: reviews
    match: {{path: {{prefix: /}}}}
    to: {{service: reviews}}
"""
_NAMES = "xds gw gw_admin app1 in1 out1 admin1 app2 in2 out2 admin2 status".split()


# run in a pod as its app: GET argv[1], print the status, then the body
_GET = """
import sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=10) as r:
    print(r.status); print(r.read().decode())
"""


def _app_get(pod: netns.Pod, url: str) -> tuple[int, str]:
    argv = pod.exec_argv([sys.executable, "-c", _GET, url])
    out = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=True).stdout
    status, _, body = out.partition("\n")
    return int(status), body


def _stat(pod: netns.Pod, admin_port: int, name: str) -> int:
    url = f"http://{pod.ip}:{admin_port}/stats?format=json&filter=^{name}$"
    with urllib.request.urlopen(url, timeout=5) as resp:
        stats = json.loads(resp.read())["stats"]
    return next((int(s["value"]) for s in stats if s.get("name") == name), 0)


@pytest.fixture
def afterwards() -> Iterator[list[Callable[[], object]]]:
    """Clean-ups run after the test whatever happened: a failing test kills its `legation up`,
    which then cannot remove its cgroup, pins or pods itself."""
    steps: list[Callable[[], object]] = []
    yield steps
    for step in steps:
        with contextlib.suppress(CaptureError):
            step()


def _holders(prog_ids: set[int]) -> set[str]:
    """The cgroups (anywhere in the hierarchy) that have one of ``prog_ids`` attached."""
    return {
        entry["cgroup"]
        for entry in bpftool("cgroup", "tree", parse=True) or []
        if prog_ids & {p["id"] for p in entry["programs"]}
    }


def test_up_ebpf_splices_the_mesh_and_leaves_nothing(
    tmp_path: Path,
    ports: dict[str, int],  # noqa: F811
    afterwards: list[Callable[[], object]],
) -> None:
    mesh = tmp_path / "mesh.yaml"
    mesh.write_text(MESH.format(**ports, greeting="hello v1", subset="v1"))
    splice = Sockmap.for_stack(Path(".legation"), ports["status"])  # the name legation up uses
    afterwards.append(splice.stop)
    crashed = Up(mesh, tmp_path, ports["status"], flags=["--ebpf"])
    try:
        crashed.wait_for("Legation is up")
        assert f"--ebpf: sockops on cgroup {splice.cgroup}" in crashed.output
        envoys = crashed.envoy_pids()
        crashed.proc.kill()  # no clean-up: the cgroup and the pins stay
        assert gone(envoys)
        assert splice.cgroup.is_dir() and splice.pins.is_dir()
    finally:
        crashed.stop()

    up = Up(mesh, tmp_path, ports["status"], flags=["--ebpf"])
    try:
        up.wait_for("Legation is up")
        assert "removed a leftover of an earlier run: sock_ops program" in up.output
        ids = set(splice.program_ids().values())
        assert _holders(ids) == {str(splice.cgroup)}  # not the root cgroup, nor any other
        in_cgroup = set((splice.cgroup / "cgroup.procs").read_text().split())
        assert {str(up.proc.pid), *map(str, up.envoy_pids())} <= in_cgroup
        before = splice.stats()
        gw = f"http://127.0.0.1:{ports['gw']}"
        for _ in range(30):
            status, body = http(gw + "/anything")
            assert status == 200 and json.loads(body)["version"] == "v1"
        assert http(gw + "/hello") == (200, "hello v1")
        # gateway -> sidecar -> demo app: each hop's bytes went through the sk_msg program
        assert splice.stats()["spliced"] - before["spliced"] >= 60
        envoys = up.envoy_pids()
        up.proc.send_signal(signal.SIGINT)
        assert up.proc.wait(30) == 0
        assert gone(envoys)
    finally:
        up.stop()
    assert "programs detached" in up.output
    assert not splice.cgroup.exists() and not splice.pins.exists()
    assert not _holders(ids)
    assert programs_gone(ids)


def test_up_capture_ebpf_redirects_at_connect_and_traffic_through_the_pods_flows(
    tmp_path: Path, afterwards: list[Callable[[], object]]
) -> None:
    lacking = netns.missing()
    if lacking:
        pytest.skip("capture needs " + "; ".join(lacking))
    chosen, cidr = distinct_ports(*_NAMES), capture_range()
    mesh = tmp_path / "mesh.yaml"
    mesh.write_text(CAPTURE_MESH.format(**chosen, cidr=cidr))
    splice = Sockmap.for_stack(Path(".legation"), chosen["status"])
    afterwards += [splice.stop, netns.Network(Capture(cidr=cidr)).clean]
    up = Up(mesh, tmp_path, chosen["status"], flags=["--capture", "--ebpf"])
    try:
        up.wait_for("Legation is up")
        assert (
            "--ebpf: connect-time redirection in 2 pods to 2 services and 2 inbound ports"
            in up.output
        )
        ids = set(splice.program_ids().values())
        assert _holders(ids) == {str(splice.cgroup)}
        kinds = {
            p["attach_type"] for p in bpftool("cgroup", "show", str(splice.cgroup), parse=True)
        }
        assert kinds == {"cgroup_sock_ops", "cgroup_inet4_connect", "cgroup_getsockopt"}
        # the sidecars' Envoys run in their pods (ip netns exec) and still in the run's cgroup
        in_cgroup = set((splice.cgroup / "cgroup.procs").read_text().split())
        assert set(map(str, up.envoy_pids())) <= in_cgroup
        frontend = netns.Network(Capture(cidr=cidr)).pod("frontend-0")
        before, cx = splice.stats(), "listener.outbound_frontend.downstream_cx_total"
        sidecar_before = _stat(frontend, chosen["admin1"], cx)
        # the frontend app (in its pod, in the cgroup) calls http://reviews:9080/ by plain URL
        status, body = _app_get(frontend, f"http://127.0.0.1:{chosen['app1']}/?call=reviews")
        assert status == 200 and json.loads(body)["calls"] == [
            {"service": "reviews", "status": 200}
        ]
        after = splice.stats()
        assert after["redirected"] - before["redirected"] == 1  # connect4 took it to the sidecar
        assert after["original"] - before["original"] == 1  # which read where it was going
        assert _stat(frontend, chosen["admin1"], cx) == sidecar_before + 1
        assert after["inbound"] - before["inbound"] >= 1  # frontend's sidecar -> reviews pod
        for _ in range(10):  # from outside through the gateway, as without --ebpf
            status, body = http(f"http://127.0.0.1:{chosen['gw']}/")
            assert status == 200 and json.loads(body)["service"] == "reviews"
        # the gateway's connections to the reviews pod went to its inbound port too
        assert splice.stats()["inbound"] > after["inbound"]
        assert splice.stats()["spliced"] - before["spliced"] >= 20
        up.proc.send_signal(signal.SIGINT)
        assert up.proc.wait(30) == 0
    finally:
        up.stop()
    assert "connections redirected at connect; programs detached" in up.output
    assert not splice.cgroup.exists() and not splice.pins.exists()
    assert programs_gone(ids)
