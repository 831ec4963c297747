"""``legation up --ebpf`` as a user runs it: real Envoys and demo apps in the run's own cgroup,
traffic through the gateway and a sidecar spliced and intact, nothing left after a stop, and a
crashed run's leftovers removed by the next start; with ``--capture`` too, the pod's sidecar in the
cgroup and traffic through it intact. Skipped (the missing things named) only where root or a
kernel feature is missing."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from legation.capture import netns
from legation.capture.ebpf import Sockmap, missing_features
from legation.capture.ebpf._kernel import bpftool
from tests.capture.test_ebpf import programs_gone
from tests.integration.test_up import MESH, Up, gone, http, ports  # noqa: F401 (a fixture)

MISSING = missing_features()
pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(bool(MISSING), reason=f"--ebpf needs: {'; '.join(MISSING)}"),
]


def _holders(prog_ids: set[int]) -> set[str]:
    """The cgroups (anywhere in the hierarchy) that have one of ``prog_ids`` attached."""
    return {
        entry["cgroup"]
        for entry in bpftool("cgroup", "tree", parse=True) or []
        if prog_ids & {p["id"] for p in entry["programs"]}
    }


def test_up_ebpf_splices_the_mesh_and_leaves_nothing(tmp_path: Path, ports: dict[str, int]) -> None:  # noqa: F811
    mesh = tmp_path / "mesh.yaml"
    mesh.write_text(MESH.format(**ports, greeting="hello v1", subset="v1"))
    splice = Sockmap.for_stack(Path(".legation"), ports["status"])  # the name legation up uses
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


def test_up_capture_ebpf_traffic_through_a_pod_sidecar_still_flows(
    tmp_path: Path,
    ports: dict[str, int],  # noqa: F811
) -> None:
    lacking = netns.missing()
    if lacking:
        pytest.skip("capture needs " + "; ".join(lacking))
    mesh = tmp_path / "mesh.yaml"
    mesh.write_text(MESH.format(**ports, greeting="hello v1", subset="v1"))
    splice = Sockmap.for_stack(Path(".legation"), ports["status"])
    up = Up(mesh, tmp_path, ports["status"], flags=["--capture", "--ebpf"])
    try:
        up.wait_for("Legation is up")
        assert "--capture: 1 pods on bridge" in up.output
        ids = set(splice.program_ids().values())
        assert _holders(ids) == {str(splice.cgroup)}
        # the sidecar's Envoy runs in its pod (ip netns exec) and still in the run's cgroup
        in_cgroup = set((splice.cgroup / "cgroup.procs").read_text().split())
        assert set(map(str, up.envoy_pids())) <= in_cgroup
        before = splice.stats()
        for _ in range(30):
            status, body = http(f"http://127.0.0.1:{ports['gw']}/anything")
            assert status == 200 and json.loads(body)["version"] == "v1"
        # gateway -> pod crosses namespaces (not spliced); in the pod, sidecar <-> app is
        assert splice.stats()["spliced"] - before["spliced"] >= 30
        up.proc.send_signal(signal.SIGINT)
        assert up.proc.wait(30) == 0
    finally:
        up.stop()
    assert not splice.cgroup.exists() and not splice.pins.exists()
    assert programs_gone(ids)
