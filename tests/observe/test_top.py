"""``legation top`` on a terminal: it redraws the tables in place until Ctrl-C (a pseudo
terminal here), reading a real status endpoint whose golden metrics come from a real aggregator."""

from __future__ import annotations

import os
import pty
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from legation.observe.aggregator import Aggregator, Entry
from legation.status_http import StatusEndpoint
from tests.loop import LoopThread


@pytest.fixture
def status_url() -> Iterator[str]:
    aggregator = Aggregator()
    for i in range(30):
        aggregator.record(Entry("gateway-gw", "gw", "gateway", "slow", "outbound|web", 200, 250.0))
        aggregator.record(Entry("gateway-gw", "gw", "gateway", "boom", "", 503 if i else 200, 1.0))
    endpoint = StatusEndpoint(
        status=lambda: {"mesh": "m"},
        registries=lambda: [],
        golden=lambda: aggregator.snapshot().to_dict(),
    )
    loop = LoopThread()
    port = loop.run(endpoint.start("127.0.0.1", 0))
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        loop.run(endpoint.stop())
        loop.close()


def test_top_redraws_on_a_terminal_until_interrupted(status_url: str) -> None:
    main, child = pty.openpty()
    # Ctrl-C reaches it whatever this process inherited: a shell's background job starts with
    # SIGINT ignored, an ignored signal stays ignored across exec, and Python keeps it so (a
    # hang in such a run). Handled here, not by a preexec_fn: that runs every at-fork handler in
    # the child, and OpenTelemetry's, from an earlier test's spans, can hang it there.
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "legation.cli", "top", "--url", status_url, "--interval", "0.2"],
            stdin=child,
            stdout=child,
            stderr=child,
        )
    finally:
        signal.signal(signal.SIGINT, inherited)
    os.close(child)
    out = b""
    deadline = time.monotonic() + 20
    try:
        while out.count(b"\x1b[H\x1b[2J") < 3:  # three frames, each clearing the screen
            assert time.monotonic() < deadline, out
            if select.select([main], [], [], 0.5)[0]:
                out += os.read(main, 65536)
    finally:
        proc.send_signal(signal.SIGINT)
        # keep reading, as a terminal does: frames written meanwhile would otherwise fill the
        # pty, and top's last flush at exit would wait on it (the test hung there under load)
        stop = time.monotonic() + 10
        while proc.poll() is None and time.monotonic() < stop:
            if select.select([main], [], [], 0.1)[0]:
                try:
                    os.read(main, 65536)
                except OSError:  # the child side closed
                    break
        code = proc.wait(5)
        os.close(main)
    frame = out.split(b"\x1b[H\x1b[2J")[-1].decode()
    assert "(Ctrl-C to quit)" in frame
    boom = next(line for line in frame.splitlines() if line.startswith("boom "))
    assert boom.split()[2] == "3.33%"  # 1 of 30 answered below 500
    assert code in (0, 130)  # Ctrl-C while sleeping, or while fetching


def test_status_carries_golden_unless_asked_not_to(status_url: str) -> None:
    import json
    import urllib.request

    def golden(query: str) -> object:
        with urllib.request.urlopen(status_url + "/status" + query, timeout=5) as resp:
            return json.loads(resp.read())["golden"]

    full = golden("")
    assert isinstance(full, dict) and {r["labels"]["route"] for r in full["scopes"]["route"]} == {
        "slow",
        "boom",
    }
    assert golden("?golden=0") is None  # what `legation up` polls twice a second
