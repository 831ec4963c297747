"""Shared fixtures: free loopback ports, demo upstreams, a real Envoy."""

from __future__ import annotations

import asyncio
import gc
import os
import random
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from legation.demo import DemoApp

# keep gRPC core chatter (GOAWAY notes) out of test output
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")


_HANDED_OUT: set[int] = set()


def _near(port: int, taken: set[int]) -> bool:
    """Whether ``port`` is one of ``taken`` or 100 i away from one (|i| <= 7)."""
    return any(port + 100 * i in taken for i in range(-7, 8))


def _listen_range() -> range:
    """Ports to hand out: below the kernel's ephemeral range (or above it).

    A port drawn by ``bind(0)`` comes from the ephemeral range, so between the draw and the
    server's own bind an outgoing connection may take it as its local port: a CI run failed on
    Envoy's ``cannot bind '127.0.0.1:40603': Address already in use``. Ports outside that range
    are never given to outgoing connections.
    """
    try:
        text = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text()
        low, high = (int(v) for v in text.split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    if low - 1 >= 12_000:
        return range(10_000, low - 1 - 700)
    if 65535 - high >= 2_000 + 700:
        return range(high + 1, 65535 - 700)
    return range(0)


_RANGE = _listen_range()
_DRAW = random.SystemRandom()


def _draw() -> int:
    if _RANGE:
        port = _DRAW.choice(_RANGE)
        return port if _bindable(port) else 0
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_port() -> int:
    """A free loopback port never handed out before in this test process.

    Ports come from outside the kernel's ephemeral range (``_listen_range``). Remembering what
    was handed out makes every call in the session distinct, and no two ports handed out
    differ by a multiple of 100 up to 700 (a request-path service's worker i listens on its
    port + 100 i, so a CI run once found ``ratelimit.port`` on ``extauthz``'s second worker).
    """
    while True:
        port = _draw()
        if port and not _near(port, _HANDED_OUT):
            if len(_HANDED_OUT) > 5_000:
                _HANDED_OUT.clear()
            _HANDED_OUT.add(port)
            return port


def worker_base_port(workers: int) -> int:
    """A free port whose worker ports (``port + 100 i``, i < ``workers``) are free too and
    handed out to nobody else in this test process."""
    while True:
        port = free_port()
        others = [port + 100 * i for i in range(1, workers)]
        rest = _HANDED_OUT - {port}
        if any(p > 65535 or _near(p, rest) or not _bindable(p) for p in others):
            continue
        _HANDED_OUT.update(others)
        return port


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def distinct_ports(*names: str) -> dict[str, int]:
    """A free loopback port per name, no two alike."""
    chosen: set[int] = set()
    while len(chosen) < len(names):
        chosen.add(free_port())
    return dict(zip(names, sorted(chosen), strict=True))


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Before an integration test: what earlier tests left alive is frozen out of the garbage
    collector's scans. Such tests run services in this process (threads and loops answering
    Envoy under deadlines); in the full suite it holds millions of objects, and one full
    collection of those stalls every thread ~0.4 s (measured with a 2M-object heap), past
    ext_proc's message timeout, where a real service process holds a small fraction of them
    (CI runs failed so: 504s in the fault suite and the ext_proc deadline test). The test's own
    objects are collected as usual; frozen ones stay (unfreezing would hand them all back to the
    oldest generation, for a later test to pay that collection at a random moment)."""
    if item.get_closest_marker("integration") is not None:
        gc.collect()
        gc.freeze()


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture
def demo_factory() -> Iterator[object]:
    """``demo_factory(name, version=..., fail_every=...)`` starts a DemoApp on a free port."""
    started: list[DemoApp] = []

    def make(name: str, **kwargs: object) -> DemoApp:
        app = DemoApp(name=name, **kwargs).start_in_thread()  # type: ignore[arg-type]
        started.append(app)
        return app

    yield make
    for app in started:
        app.stop_thread()


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    """The loops an async test runs on: asyncio's own; and uvloop too (what ``legation serve``
    runs the services on, :mod:`legation._loop`) for tests marked ``either_loop``: those of
    the loop-sensitive parts (TLS, subprocess pipes, timers and cancellation)."""
    if item.get_closest_marker("either_loop") is None:
        return {"asyncio": asyncio.new_event_loop}
    import uvloop

    return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
