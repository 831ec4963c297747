"""Pods following the mesh on the real kernel (no Envoy): a reload adds and removes pods, rewrites
hosts files and replaces rules that changed; a stop removes everything."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from legation.capture import netns
from legation.capture.errors import CaptureError
from legation.capture.pods import Pods
from legation.config import Mesh
from legation.config.capture import Capture
from tests.capture.conftest import capture_range
from tests.config.meshdata import parse


def _mesh(cidr: str, services: dict[str, int]) -> Mesh:
    """One instance with a sidecar per service (name -> app port)."""
    data: dict[str, Any] = {
        "capture": {"cidr": cidr},
        "services": [
            {
                "name": name,
                "port": 9080,
                "endpoints": [
                    {
                        "port": port,
                        "sidecar": {
                            "inbound_port": 15000 + k,
                            "outbound_port": 15100 + k,
                            "admin_port": 15200 + k,
                        },
                    }
                ],
            }
            for k, (name, port) in enumerate(services.items())
        ],
    }
    return parse(data)


@pytest.mark.integration
def test_pods_follow_reloads_and_a_stop_removes_them(need_capture: None) -> None:
    cidr = str(capture_range())
    first = _mesh(cidr, {"a": 9101, "b": 9102})
    assert first.capture is not None
    pods = Pods(first.capture)
    try:
        assert pods.start(first) == []
        assert pods.relayed == [("127.0.0.1", 18000)]
        assert sorted(pods.pods) == ["a-0", "b-0"]
        hosts = (netns.ETC_NETNS / pods.pods["a-0"].netns / "hosts").read_text()
        cap = Capture(cidr=first.capture.cidr)
        assert f"{cap.service_ip('b')} b\n" in hosts

        second = _mesh(cidr, {"a": 9201, "c": 9103})
        b = pods.pods["b-0"]
        assert pods.follow(second) == (["c-0"], ["b-0"])
        listed = netns.run(["ip", "netns", "list"])
        assert b.netns not in listed and pods.pods["c-0"].netns in listed
        hosts = (netns.ETC_NETNS / pods.pods["a-0"].netns / "hosts").read_text()
        assert f"{cap.service_ip('c')} c\n" in hosts and " b\n" not in hosts
        rules = netns.run(pods.pods["a-0"].exec_argv(["iptables", "-t", "nat", "-S"]))
        assert "--dport 9201 -j LEGATION_IN_REDIRECT" in rules
        assert "--dport 9101" not in rules
        # the relayed xDS port: only the sidecar's group may connect there
        filters = netns.run(pods.pods["a-0"].exec_argv(["iptables", "-S", "OUTPUT"]))
        assert f"-d {cap.bridge_ip}/32 -p tcp -m tcp --dport 18000" in filters
        assert "! --gid-owner 1337 -j REJECT --reject-with tcp-reset" in filters
    finally:
        removed = asyncio.run(pods.stop())
    assert pods.network.bridge in removed
    assert pods.network.prefix not in netns.run(["ip", "netns", "list"])
    assert not list(netns.ETC_NETNS.glob(pods.network.prefix + "*"))


@pytest.mark.integration
def test_a_second_run_on_a_live_range_refuses_and_removes_nothing(need_capture: None) -> None:
    mesh = _mesh(str(capture_range()), {"a": 9101})
    assert mesh.capture is not None
    live, second = Pods(mesh.capture), Pods(mesh.capture)
    try:
        live.start(mesh)
        with pytest.raises(CaptureError) as info:
            second.start(mesh)
        assert info.value.code == "capture_in_use"
        assert "is in use by a running legation up" in str(info.value)
        assert asyncio.run(second.stop()) == []
        assert live.pods["a-0"].netns in netns.run(["ip", "netns", "list"])
    finally:
        asyncio.run(live.stop())
    assert live.network.prefix not in netns.run(["ip", "netns", "list"])
