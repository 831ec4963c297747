from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from legation.xds.cache import SnapshotCache
from legation.xds.client import AdsClient
from legation.xds.server import XdsServer
from tests.xds.pki import TestPki


@dataclass
class XdsUnderTest:
    """A running authenticated xDS server and the CA its clients' credentials come from."""

    server: XdsServer
    pki: TestPki

    @property
    def cache(self) -> SnapshotCache:
        return self.server.cache

    @property
    def address(self) -> str:
        return self.server.address

    def credentials(self, node: str) -> grpc.ChannelCredentials:
        return self.pki.credentials(node)

    def client(self, node: str, **kwargs: Any) -> AdsClient:
        """An ADS client presenting ``node``'s credential."""
        return AdsClient(self.address, node, credentials=self.credentials(node), **kwargs)


@pytest.fixture
def pki(tmp_path: Path) -> TestPki:
    return TestPki(tmp_path)


@pytest.fixture
async def xds(pki: TestPki) -> AsyncIterator[XdsUnderTest]:
    """An authenticated xDS server on an ephemeral loopback port with a debounce of 10 ms."""
    cache = SnapshotCache(debounce=0.01)
    server = await pki.server(cache, port=0, gate_timeout=2.0).start()
    yield XdsUnderTest(server, pki)
    await server.stop(0)
