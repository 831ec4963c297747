"""The ``capture:`` block: derived addresses, inbound ports, ``--capture`` on a mesh without one."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from legation.config import MeshConfigError
from legation.config.capture import Capture, with_capture
from tests.config.meshdata import base, parse


def test_addresses_are_stable_inside_the_range_and_never_the_bridge() -> None:
    c = Capture(cidr=ipaddress.IPv4Network("10.77.0.0/24"))
    assert c.bridge_ip == "10.77.0.1"
    ips = {c.instance_ip(f"app-{i}") for i in range(50)} | {c.service_ip("reviews")}
    for ip in ips:
        addr = ipaddress.IPv4Address(ip)
        assert addr in c.cidr
        assert ip not in ("10.77.0.0", "10.77.0.1", "10.77.0.255")
    assert c.instance_ip("app-1") == Capture(cidr=c.cidr).instance_ip("app-1")
    assert c.instance_ip("reviews") != c.service_ip("reviews")


def test_inbound_ports_default_to_the_app_port_minus_excluded() -> None:
    assert Capture().inbound_ports(9111) == [9111]
    c = Capture.model_validate({"inbound": {"exclude_ports": [9111]}})
    assert c.inbound_ports(9111) == []
    c = Capture.model_validate({"inbound": {"include_ports": [80, 81, 80]}})
    assert c.inbound_ports(9111) == [80, 81]


def test_a_capture_block_parses_and_checks() -> None:
    data = base()
    data["capture"] = {"cidr": "10.50.0.0/16", "outbound": {"exclude_cidrs": ["192.0.2.0/24"]}}
    mesh = parse(data)
    assert mesh.capture is not None
    assert mesh.capture.outbound.exclude_cidrs == [ipaddress.IPv4Network("192.0.2.0/24")]


def test_with_capture_adds_the_defaults_and_keeps_a_block() -> None:
    mesh = parse(base())
    assert mesh.capture is None
    assert with_capture(mesh, source="m.yaml").capture == Capture()
    data = base()
    data["capture"] = {"proxy_gid": 2000}
    own = parse(data)
    assert with_capture(own, source="m.yaml") is own


def test_with_capture_checks_the_defaults() -> None:
    """Two names colliding in the default range are reported with the file name."""
    c = Capture()
    seen: dict[str, str] = {}
    names: tuple[str, str] | None = None
    for i in range(100_000):
        ip = c.service_ip(f"s{i}")
        if ip in seen:
            names = (seen[ip], f"s{i}")
            break
        seen[ip] = f"s{i}"
    assert names is not None
    data = base()
    data["services"] = [
        {"name": n, "port": 9080, "endpoints": [{"port": 9100 + k}]} for k, n in enumerate(names)
    ]
    data["routes"] = []
    with pytest.raises(MeshConfigError) as info:
        with_capture(parse(data), source="m.yaml")
    assert str(info.value).startswith("m.yaml: capture.cidr: service ")


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40))
def test_any_cidr_text_is_a_network_or_one_named_problem(text: str) -> None:
    data = base()
    data["capture"] = {"cidr": text}
    try:
        mesh = parse(data)
    except MeshConfigError as err:
        assert len(err.problems) == 1
        assert err.problems[0].path == "capture.cidr"
    else:
        assert mesh.capture is not None
        assert 8 <= mesh.capture.cidr.prefixlen <= 24


def test_a_running_mesh_may_not_change_its_range_group_or_capture_itself() -> None:
    from legation.config.capture import capture_change_problems

    plain = parse(base())
    data = base()
    data["capture"] = {"cidr": "10.50.0.0/16"}
    on = parse(data)
    data["capture"] = {"cidr": "10.51.0.0/16", "proxy_gid": 2000}
    moved = parse(data)
    data["capture"] = {"cidr": "10.50.0.0/16", "outbound": {"exclude_ports": [22]}}
    tuned = parse(data)
    assert [(p.path, p.message) for p in capture_change_problems(plain, on)] == [
        ("capture", "cannot be turned on while running: restart legation up")
    ]
    assert capture_change_problems(on, plain)[0].message.startswith("cannot be turned off")
    assert [p.path for p in capture_change_problems(on, moved)] == [
        "capture.cidr",
        "capture.proxy_gid",
    ]
    assert capture_change_problems(on, tuned) == []  # rules follow a reload
    assert capture_change_problems(plain, plain) == []
