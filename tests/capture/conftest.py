"""Capture tests run on the real kernel: network namespaces, veths, a bridge, iptables.

They need root and the ``ip``/``iptables-restore`` tools; without them they are skipped, and the
reason names what is missing. Each test takes its own /24 of 10.0.0.0/8 (from its process id and a
counter), so tests and runs do not collide, and removes what it made.
"""

from __future__ import annotations

import ipaddress
import itertools
import os
import time
from collections.abc import Iterator

import pytest

from legation.capture import netns
from legation.config.capture import Capture

_counter = itertools.count()


def capture_range() -> ipaddress.IPv4Network:
    """A /24 no other test process of this run uses (10.200-249.x.0/24)."""
    n = (os.getpid() * 16 + next(_counter)) % (50 * 256)
    return ipaddress.IPv4Network(f"10.{200 + n // 256}.{n % 256}.0/24")


STALE_AFTER = 600.0  # seconds: a test's pods older than this, with no process, are leftovers


@pytest.fixture(scope="session", autouse=True)
def _sweep_stale_test_pods() -> None:
    """Remove what a killed test process left in the test ranges (10.200-249.x.0/24): pods
    with no process in them, made more than STALE_AFTER ago. A running test's pods are younger
    or busy, and nothing outside the test ranges is looked at."""
    if netns.missing():
        return
    tags = {
        netns.Network(Capture(cidr=ipaddress.IPv4Network(f"10.{a}.{b}.0/24"))).tag: (a, b)
        for a in range(200, 250)
        for b in range(256)
    }
    stale: set[tuple[int, int]] = set()
    for name in netns.run(["ip", "netns", "list"]).split():
        tag = name.removeprefix(netns.NETNS_PREFIX).split("-", 1)[0]
        if not name.startswith(netns.NETNS_PREFIX) or tag not in tags:
            continue
        etc = netns.ETC_NETNS / name
        age = time.time() - etc.stat().st_mtime if etc.exists() else STALE_AFTER + 1
        if age > STALE_AFTER and not netns.run(["ip", "netns", "pids", name]).split():
            stale.add(tags[tag])
    for a, b in stale:
        netns.Network(Capture(cidr=ipaddress.IPv4Network(f"10.{a}.{b}.0/24"))).clean()


@pytest.fixture
def need_capture() -> None:
    lacking = netns.missing()
    if lacking:
        pytest.skip("capture needs " + "; ".join(lacking))


@pytest.fixture
def network(need_capture: None) -> Iterator[netns.Network]:
    net = netns.Network(Capture(cidr=capture_range()))
    net.clean()
    net.check_range()
    try:
        yield net
    finally:
        net.clean()
