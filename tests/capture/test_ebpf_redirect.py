"""``--capture --ebpf``'s connect-time redirection on the real kernel, in a network namespace of
the test's own: an app's connect() to a listed service address lands on the sidecar's port, the
sidecar reads the original destination with SO_ORIGINAL_DST (no NAT, no conntrack entry), and the
hop is spliced; unlisted ports, the sidecar's group and unlisted namespaces are left alone."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from legation.capture import netns
from legation.capture.ebpf import Sockmap
from legation.capture.ebpf.redirect import redirected
from legation.capture.rules import pod_rules
from legation.config.capture import Capture
from tests.capture.test_ebpf import ECHO, MISSING, _name

pytestmark = pytest.mark.skipif(
    bool(MISSING) or bool(netns.missing()),
    reason=f"needs: {'; '.join(MISSING + netns.missing())}",
)
VIP, PORT, OUTBOUND, GID = "10.251.0.7", 9080, 15001, 1337
_spaces = itertools.count()


@pytest.fixture
def space() -> Iterator[str]:
    """A network namespace with its loopback up (no other interface: nothing else routes)."""
    name = f"legation-ebpf-{os.getpid()}-{next(_spaces)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


@pytest.fixture
def sockmap() -> Iterator[Sockmap]:
    splice = Sockmap(name=_name())
    try:
        yield splice.start()
    finally:
        splice.stop()


def _in(space: str, *argv: str) -> list[str]:
    return ["ip", "netns", "exec", space, sys.executable, str(ECHO), *argv]


def _dial_to(space: str, ip: str, port: int, preexec: Callable[[], None]) -> str:
    done = subprocess.run(
        _in(space, "dial", ip, str(port)),
        capture_output=True, text=True, timeout=30, check=True, preexec_fn=preexec,
    )  # fmt: skip
    return done.stdout.strip()


def _dial(space: str, port: int, preexec: Callable[[], None]) -> str:
    done = subprocess.run(
        _in(space, "dial", VIP, str(port)),
        capture_output=True, text=True, timeout=30, check=True, preexec_fn=preexec,
    )  # fmt: skip
    return done.stdout.strip()


def test_an_apps_connect_lands_on_its_sidecar_which_reads_the_original_destination(
    sockmap: Sockmap, space: str
) -> None:
    sockmap.redirect({space: OUTBOUND}, GID, [(VIP, PORT)])
    join = sockmap.preexec()

    def as_sidecar() -> None:
        join()
        os.setgid(GID)

    with subprocess.Popen(
        _in(space, "sidecar", str(OUTBOUND), "1"), stdout=subprocess.PIPE, text=True,
        preexec_fn=join,
    ) as sidecar:  # fmt: skip
        try:
            assert sidecar.stdout is not None and sidecar.stdout.readline().strip() == str(OUTBOUND)
            before = sockmap.stats()
            assert _dial(space, PORT, join) == f"{VIP}:{PORT}"  # reached, and its origin known
            after = sockmap.stats()
            assert after["redirected"] - before["redirected"] == 1
            assert after["original"] - before["original"] == 1
            assert after["spliced"] - before["spliced"] >= 40  # 20 echoes, both ways
            # left alone, so they reach nothing (the namespace has no route to the VIP):
            assert _dial(space, PORT + 1, join) == "unreachable"  # a port not listed
            assert _dial(space, PORT, as_sidecar) == "unreachable"  # the sidecar's own group
            assert sockmap.stats()["redirected"] == after["redirected"]
            assert sidecar.wait(timeout=20) == 0
        finally:
            sidecar.kill()


def test_outside_the_listed_namespaces_and_the_cgroup_nothing_is_redirected(
    sockmap: Sockmap, space: str
) -> None:
    sockmap.redirect({}, GID, [(VIP, PORT)])  # no pod listed
    assert _dial(space, PORT, sockmap.preexec()) == "unreachable"
    sockmap.redirect({space: OUTBOUND}, GID, [(VIP, PORT)])
    assert _dial(space, PORT, lambda: None) == "unreachable"  # a process outside the cgroup
    assert sockmap.stats()["redirected"] == 0


def test_a_pod_or_service_dropped_on_reload_is_no_longer_redirected(
    sockmap: Sockmap, space: str
) -> None:
    join = sockmap.preexec()
    for pods, services in (({space: OUTBOUND}, []), ({}, [(VIP, PORT)])):
        sockmap.redirect({space: OUTBOUND}, GID, [(VIP, PORT)])
        sockmap.redirect(pods, GID, services)  # the reloaded mesh: one of the two gone
        assert _dial(space, PORT, join) == "unreachable"
    assert sockmap.stats()["redirected"] == 0


def test_a_sidecars_connect_to_another_pods_app_port_goes_to_its_inbound_port_and_is_spliced(
    sockmap: Sockmap, network: netns.Network
) -> None:
    cap = network.capture
    network.create_bridge()
    a, b = network.pod("ebpf-a"), network.pod("ebpf-b")
    for pod, app in ((a, 9081), (b, PORT)):
        rules = pod_rules(cap, pod_ip=pod.ip, app_port=app, inbound_port=15006,
                          outbound_port=OUTBOUND, admin_port=15000)  # fmt: skip
        network.add_pod(pod, hosts="127.0.0.1 localhost\n", rules=rules)
    sockmap.redirect(
        {a.netns: OUTBOUND, b.netns: OUTBOUND}, cap.proxy_gid, [], [(b.ip, PORT, 15006)]
    )
    join = sockmap.preexec()

    def as_sidecar() -> None:
        join()
        os.setgid(cap.proxy_gid)

    argv = ["ip", "netns", "exec", b.netns, sys.executable, str(ECHO), "sidecar", "15006", "1"]
    with subprocess.Popen(
        [*argv, "0.0.0.0"], stdout=subprocess.PIPE, text=True, preexec_fn=as_sidecar
    ) as sidecar_b:
        try:
            assert sidecar_b.stdout is not None and sidecar_b.stdout.readline().strip() == "15006"
            before = sockmap.stats()
            # an app in pod A is not a sidecar: its rules send it to sidecar A (absent here)
            assert _dial_to(a.netns, b.ip, PORT, join) == "unreachable"
            assert sockmap.stats()["inbound"] == before["inbound"]
            # sidecar A calls pod B's app port: it lands on B's inbound port with no REDIRECT
            # (the kernel's original destination is the inbound port itself) and is spliced
            assert _dial_to(a.netns, b.ip, PORT, as_sidecar) == f"{b.ip}:15006"
            after = sockmap.stats()
            assert after["inbound"] - before["inbound"] == 1
            assert after["spliced"] - before["spliced"] >= 40  # across the two namespaces
            assert sidecar_b.wait(timeout=20) == 0
        finally:
            sidecar_b.kill()


def test_the_services_redirected_are_those_the_pod_rules_capture() -> None:
    capture = Capture.model_validate(
        {"outbound": {"exclude_ports": [9090], "exclude_cidrs": ["10.213.9.0/24"]}}
    )
    assert redirected(capture, "10.213.0.5", 9080)
    assert not redirected(capture, "10.213.0.5", 9090)
    assert not redirected(capture, "10.213.9.5", 9080)
    narrow = Capture.model_validate(
        {"outbound": {"include_ports": [9080], "include_cidrs": ["10.213.0.0/24"]}}
    )
    assert redirected(narrow, "10.213.0.5", 9080)
    assert not redirected(narrow, "10.213.0.5", 8080)
    assert not redirected(narrow, "10.213.1.5", 9080)


def test_a_stop_detaches_the_connect_and_getsockopt_programs_too(space: str) -> None:
    splice = Sockmap(name=_name()).start()
    try:
        splice.redirect({space: OUTBOUND}, GID, [(VIP, PORT)])
        from legation.capture.ebpf._kernel import bpftool

        kinds = {
            p["attach_type"] for p in bpftool("cgroup", "show", str(splice.cgroup), parse=True)
        }
        assert kinds == {"cgroup_sock_ops", "cgroup_inet4_connect", "cgroup_getsockopt"}
    finally:
        splice.stop()
    assert not splice.cgroup.exists() and not Path(splice.pins).exists()
