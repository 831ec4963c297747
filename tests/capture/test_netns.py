"""Pods on the real kernel: the capture rules redirect what they should and nothing else."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from legation.capture import netns
from legation.capture.errors import CaptureError
from legation.capture.relay import Relay
from legation.capture.rules import hosts_file, pod_rules
from legation.config.capture import Capture
from tests.capture.conftest import capture_range
from tests.conftest import distinct_ports, free_port

# Inside a pod: a listener on the outbound port reporting the original destination of what it
# accepts; then a connection to argv[1]:argv[2] (as group argv[3] when given).
_PROBE = r"""
import os, socket, struct, sys, threading
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", 15001)); srv.listen()
srv.settimeout(1.5)
seen = []
def accept():
    try:
        c, _ = srv.accept()
    except OSError:
        return
    raw = c.getsockopt(socket.SOL_IP, 80, 16)  # SO_ORIGINAL_DST
    port, ip = struct.unpack("!2xH4s8x", raw)
    seen.append(f"{socket.inet_ntoa(ip)}:{port}")
t = threading.Thread(target=accept); t.start()
if len(sys.argv) > 3:
    os.setgroups([]); os.setgid(int(sys.argv[3]))
s = socket.socket(); s.settimeout(1)
try:
    s.connect((socket.gethostbyname(sys.argv[1]), int(sys.argv[2])))
except OSError:
    pass  # not captured: nothing answers there
t.join(); s.close(); srv.close()
print(seen[0] if seen else "not captured")
"""


def _pod(network: netns.Network, name: str, capture: Capture) -> netns.Pod:
    pod = network.pod(name)
    rules = pod_rules(
        capture,
        pod_ip=pod.ip,
        app_port=9080,
        inbound_port=15006,
        outbound_port=15001,
        admin_port=15000,
    )
    network.add_pod(pod, hosts=hosts_file(capture, ["reviews"]), rules=rules)
    return pod


def _probe(pod: netns.Pod, *args: str) -> str:
    done = subprocess.run(
        pod.exec_argv([sys.executable, "-c", _PROBE, *args]),
        capture_output=True,
        text=True,
        timeout=20,
        check=True,
    )
    return done.stdout.strip()


@pytest.mark.integration
def test_app_traffic_is_captured_and_the_sidecars_is_not(network: netns.Network) -> None:
    capture = network.capture
    network.create_bridge()
    pod = _pod(network, "app-0", capture)
    vip = capture.service_ip("reviews")
    # the app resolves the service name through the pod's hosts file, and is captured
    assert _probe(pod, "reviews", "9080") == f"{vip}:9080"
    # the sidecar's group is not (no loop); 127.0.0.1 is not
    assert _probe(pod, "reviews", "9080", str(capture.proxy_gid)) == "not captured"
    assert _probe(pod, "127.0.0.1", "9") == "not captured"
    listed = netns.run(pod.exec_argv(["iptables", "-t", "nat", "-S"]))
    assert "-A LEGATION_REDIRECT -p tcp -j REDIRECT --to-ports 15001" in listed
    # the host's own nat table never gets a Legation chain
    assert "LEGATION" not in netns.run(["iptables", "-t", "nat", "-S"])
    # no IPv6 in the pod (the rules are IPv4): no link-local address to reach others past them
    assert netns.run(["ip", "-n", pod.netns, "-6", "addr", "show"]).strip() == ""


@pytest.mark.integration
def test_excluded_ports_and_cidrs_bypass(need_capture: None) -> None:
    from tests.capture.conftest import capture_range

    capture = Capture.model_validate(
        {
            "cidr": str(capture_range()),
            "outbound": {"exclude_ports": [5432], "exclude_cidrs": ["192.0.2.0/24"]},
        }
    )
    network = netns.Network(capture)
    network.clean()
    try:
        network.create_bridge()
        pod = _pod(network, "app-0", capture)
        assert _probe(pod, "reviews", "5432") == "not captured"
        assert _probe(pod, "192.0.2.77", "80") == "not captured"
        assert _probe(pod, "192.0.3.77", "80") == "192.0.3.77:80"
    finally:
        network.clean()


@pytest.mark.integration
def test_clean_removes_everything_a_crashed_run_left(network: netns.Network) -> None:
    network.create_bridge()
    pod = _pod(network, "app-0", network.capture)
    assert pod.netns in netns.run(["ip", "netns", "list"])
    # an app that outlived its run (it may clear its parent-death signal): killed with its pod
    left = subprocess.Popen(
        pod.exec_argv(["sleep", "300"]), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 10
        while str(left.pid) not in netns.run(["ip", "netns", "pids", pod.netns]).split():
            assert time.monotonic() < deadline and left.poll() is None
            time.sleep(0.05)
        removed = network.clean()
        assert left.wait(10) == -signal.SIGKILL
    finally:
        if left.poll() is None:
            left.kill()
            left.wait()
    assert pod.netns in removed and network.bridge in removed
    assert pod.netns not in netns.run(["ip", "netns", "list"])
    links = netns.run(["ip", "-o", "link", "show"])
    assert network.bridge not in links and pod.veth not in links
    assert not (netns.ETC_NETNS / pod.netns).exists()


@pytest.mark.integration
def test_a_range_the_host_routes_is_refused(network: netns.Network) -> None:
    network.create_bridge()  # its own route is fine
    network.check_range()
    other = netns.Network(Capture(cidr=network.capture.cidr.supernet(new_prefix=20)))
    with pytest.raises(CaptureError) as info:
        other.check_range()
    assert info.value.code == "capture_unavailable"
    assert f"overlaps the host's route '{network.capture.cidr} dev {network.bridge}" in str(
        info.value
    )


def test_a_failing_command_names_itself() -> None:
    with pytest.raises(CaptureError) as info:
        netns.run(["ip", "link", "show", "lg-no-such-link"])
    assert str(info.value).startswith("ip link show lg-no-such-link: ")


def test_without_the_capabilities_capture_refuses_and_names_them(tmp_path: Path) -> None:
    """A real process without CAP_NET_ADMIN and CAP_SYS_ADMIN (dropped by setpriv): `legation up
    --capture` starts nothing and says what is missing."""
    if shutil.which("setpriv") is None or netns.missing():
        pytest.skip("needs setpriv and the capabilities to drop")
    mesh = tmp_path / "mesh.yaml"
    mesh.write_text("services: [{name: web, port: 9080, endpoints: [{port: 9111}]}]\n")
    drop = ["setpriv", "--inh-caps=-net_admin,-sys_admin", "--bounding-set=-net_admin,-sys_admin"]
    done = subprocess.run(
        [*drop, sys.executable, "-m", "legation.cli", "up", "--capture", "--plain", str(mesh)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert done.returncode == 2
    assert (
        "--capture needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN, for network namespaces and "
        "iptables) (run without --capture otherwise)"
    ) in done.stdout
    assert "control plane:" not in done.stdout


@pytest.mark.integration
@pytest.mark.slow
def test_without_the_capabilities_the_rest_works(tmp_path: Path) -> None:
    """The same process, without --capture: the mesh comes up and answers through its gateway."""
    if shutil.which("setpriv") is None or netns.missing():
        pytest.skip("needs setpriv and the capabilities to drop")
    p = distinct_ports("xds", "gw", "gw_admin", "app", "status")
    mesh = tmp_path / "mesh.yaml"
    mesh.write_text(
        f"xds: {{port: {p['xds']}}}\n"
        f"gateway: {{port: {p['gw']}, admin_port: {p['gw_admin']}}}\n"
        f"services: [{{name: web, port: 9080, endpoints: [{{port: {p['app']}, demo: {{}}}}]}}]\n"
        "routes: [{name: web, match: {path: {prefix: /}}, to: {service: web}}]\n"
    )
    drop = ["setpriv", "--inh-caps=-net_admin,-sys_admin", "--bounding-set=-net_admin,-sys_admin"]
    log = tmp_path / "up.log"
    command = [sys.executable, "-m", "legation.cli", "up", "--plain", str(mesh)]
    with open(log, "w") as out:
        up = subprocess.Popen(
            [*drop, *command, "--status-port", str(p["status"]), "--log-dir", str(tmp_path)],
            stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while "Legation is up" not in log.read_text() and time.monotonic() < deadline:
            assert up.poll() is None, log.read_text()
            time.sleep(0.1)
        assert "Legation is up" in log.read_text()
        with urllib.request.urlopen(f"http://127.0.0.1:{p['gw']}/", timeout=5) as resp:
            assert json.loads(resp.read())["service"] == "web"
    finally:
        up.send_signal(signal.SIGINT)
        assert up.wait(30) == 0


_CONNECT = """
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3).close()
    print("accepted")
except OSError as e:
    print(type(e).__name__)
"""


@pytest.mark.integration
def test_the_relay_answers_the_pods_and_refuses_other_networks(network: netns.Network) -> None:
    """A pod on the bridge reaches the relay; a namespace routed to the bridge address over
    another link (a network the host is on) is refused: the relay is bound to the bridge."""
    network.create_bridge()
    pod = network.pod("app-0")
    network.add_pod(pod, hosts="", rules="*nat\nCOMMIT\n")
    # an outsider: its own link to the host (not the bridge), a route to the bridge address
    outsider = network.prefix + "outsider"
    link = f"lg{network.tag}outsid"
    _, second, third, _ = network.capture.bridge_ip.split(".")  # a /31 of 10.199/16 of its own
    near = f"10.199.{third}.{2 * (int(second) - 200)}"
    far = f"10.199.{third}.{2 * (int(second) - 200) + 1}"
    netns.run(["ip", "netns", "add", outsider])
    netns.run(
        ["ip", "link", "add", link, "type", "veth", "peer", "name", "eth0", "netns", outsider]
    )
    netns.run(["ip", "addr", "add", f"{near}/31", "dev", link])
    netns.run(["ip", "link", "set", link, "up"])
    for args in (["addr", "add", f"{far}/31", "dev", "eth0"], ["link", "set", "eth0", "up"]):
        netns.run(["ip", "-n", outsider, *args])
    netns.run(["ip", "-n", outsider, "route", "add", network.capture.bridge_ip, "via", near])

    async def probe() -> tuple[str, str]:
        target = ("127.0.0.1", 9)  # nothing needs to answer behind the relay for this test
        relay = Relay(network.capture.bridge_ip, [target], device=network.bridge)
        relay.targets = [(target[0], free_port())]
        await relay.start()
        port = relay.targets[0][1]
        try:
            argv = [sys.executable, "-c", _CONNECT, network.capture.bridge_ip, str(port)]
            inside = await asyncio.to_thread(netns.run, pod.exec_argv(argv))
            outside = await asyncio.to_thread(netns.run, ["ip", "netns", "exec", outsider, *argv])
        finally:
            await relay.stop()
        return inside.strip(), outside.strip()

    assert asyncio.run(probe()) == ("accepted", "ConnectionRefusedError")


_PORTS = st.lists(st.integers(1, 65535), max_size=3, unique=True)
_CIDRS = st.lists(
    st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 32)).map(
        lambda t: str(ipaddress.IPv4Network((t[0], t[1]), strict=False))
    ),
    max_size=2,
    unique=True,
)


@pytest.mark.integration
@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    inbound=st.tuples(_PORTS, _PORTS),
    outbound=st.tuples(_PORTS, _PORTS, _CIDRS, _CIDRS),
    gid=st.integers(1, 65534),
    relayed=_PORTS,
)
def test_any_valid_capture_block_gives_rules_iptables_accepts(
    network: netns.Network,
    inbound: tuple[list[int], list[int]],
    outbound: tuple[list[int], list[int], list[str], list[str]],
    gid: int,
    relayed: list[int],
) -> None:
    """Whatever a capture block the checks accept says, its pod rules parse in iptables-restore
    (checked with --test inside a namespace of this test's)."""
    raw = {
        "cidr": str(network.capture.cidr),
        "proxy_gid": gid,
        "inbound": {"include_ports": inbound[0], "exclude_ports": inbound[1]},
        "outbound": dict(
            zip(
                ["include_ports", "exclude_ports", "include_cidrs", "exclude_cidrs"],
                outbound,
                strict=True,
            )
        ),
    }
    assume(not set(inbound[0]) & set(inbound[1]) and not set(outbound[0]) & set(outbound[1]))
    assume(not set(outbound[2]) & set(outbound[3]))
    capture = Capture.model_validate(raw)
    pod = network.pod("fuzz")
    if pod.netns not in netns.run(["ip", "netns", "list"]):
        netns.run(["ip", "netns", "add", pod.netns])
    rules = pod_rules(
        capture, pod_ip=pod.ip, app_port=9080, inbound_port=15006, outbound_port=15001,
        admin_port=15000, host_ports=relayed,
    )  # fmt: skip
    netns.run(pod.exec_argv(["iptables-restore", "--test"]), stdin=rules)


def test_the_range_lock_follows_no_symlink_and_lives_in_a_private_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """/run/lock is world-writable: a local user could plant a symlink at the lock's
    predictable name and have root create (or hold) a file elsewhere. The lock lives in a
    directory only its owner may write, and a symlink at its name is refused, not followed."""
    network = netns.Network(Capture(cidr=capture_range()))
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    monkeypatch.setattr(netns, "LOCK_DIR", shared)
    with pytest.raises(CaptureError, match="no one else may write"):
        network.lock()
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    monkeypatch.setattr(netns, "LOCK_DIR", private)
    target = tmp_path / "victim"
    (private / f"legation-capture-{network.tag}.lock").symlink_to(target)
    with pytest.raises(CaptureError, match="cannot open the capture lock"):
        network.lock()
    assert not target.exists()
