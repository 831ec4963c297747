"""Capture tests run on the real kernel: network namespaces, veths, a bridge, iptables.

They need root and the ``ip``/``iptables-restore`` tools; without them they are skipped, and the
reason names what is missing. Each test takes its own /24 of 10.0.0.0/8 (from its process id and a
counter), so tests and runs do not collide, and removes what it made.
"""

from __future__ import annotations

import ipaddress
import itertools
import os
from collections.abc import Iterator

import pytest

from legation.capture import netns
from legation.config.capture import Capture

_counter = itertools.count()


def capture_range() -> ipaddress.IPv4Network:
    """A /24 no other test process of this run uses (10.200-249.x.0/24)."""
    n = (os.getpid() * 16 + next(_counter)) % (50 * 256)
    return ipaddress.IPv4Network(f"10.{200 + n // 256}.{n % 256}.0/24")


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
