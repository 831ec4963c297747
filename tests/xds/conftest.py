from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from legation.xds.cache import SnapshotCache
from legation.xds.server import XdsServer


@pytest.fixture
async def xds() -> AsyncIterator[XdsServer]:
    """An xDS server on an ephemeral loopback port with a debounce of 10 ms."""
    cache = SnapshotCache(debounce=0.01)
    server = await XdsServer(cache, port=0, gate_timeout=2.0).start()
    yield server
    await server.stop(0)
