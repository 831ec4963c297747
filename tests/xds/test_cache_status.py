"""What the cache keeps per node: entries only for streams that are watching (so authenticated),
dropped when a node with no snapshot of its own disconnects; NACK text kept bounded, logged
escaped."""

from __future__ import annotations

import logging

import pytest

from legation.xds.cache import NACK_MESSAGE_LIMIT, SnapshotCache
from legation.xds.snapshot import Snapshot
from legation.xds.types import ResourceType as T


def test_recording_for_a_node_that_is_not_watching_creates_no_entry() -> None:
    cache = SnapshotCache(debounce=0)
    cache.record_push("ghost", T.CLUSTER, 10)
    cache.record_ack("ghost", T.CLUSTER, "v1")
    cache.record_nack("ghost", T.CLUSTER, "v1", "no")
    assert cache.status == {}


def test_a_disconnected_node_without_a_snapshot_is_forgotten() -> None:
    cache = SnapshotCache(debounce=0)
    cache.set_snapshot("known", Snapshot("v1"))
    watches = [cache.watch(f"stranger-{i}", "fleet", lambda: None) for i in range(100)]
    known = cache.watch("known", "", lambda: None)
    assert len(cache.status) == 101
    for w in watches:
        cache.unwatch(w)
    cache.unwatch(known)
    assert set(cache.status) == {"known"}  # a proxy the config knows stays, shown disconnected
    assert cache.status["known"].streams == 0
    cache.clear_snapshot("known")
    assert cache.status == {}


def test_nack_text_is_bounded_and_logged_escaped(caplog: pytest.LogCaptureFixture) -> None:
    cache = SnapshotCache(debounce=0)
    cache.set_snapshot("n1", Snapshot("v1"))
    cache.watch("n1", "", lambda: None)
    message = "bad\n2026-01-01 INFO forged\x1b[2J\x00" + "x" * 5000
    with caplog.at_level(logging.WARNING, "legation.xds"):
        cache.record_nack("n1", T.CLUSTER, "v1", message)
    nack = cache.status["n1"].last_nack
    assert nack is not None and len(nack.message) == NACK_MESSAGE_LIMIT
    logged = caplog.records[-1].getMessage()
    assert "\n" not in logged and "\x1b" not in logged and "\x00" not in logged
    assert "bad\\n2026" in logged and len(logged) < NACK_MESSAGE_LIMIT + 300
