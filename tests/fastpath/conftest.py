"""Fixtures: the fast-path server with the table's config, in-process on the test's loop."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from legation import plugins
from legation.fastpath.server import CalloutServer, Settings, start_server
from tests.fastpath.cases import (
    CLIENT_HEADERS,
    POLICY,
    UPSTREAM_HEADERS,
    TableFactory,
    service_config,
)


@pytest.fixture
def table_plugin() -> object:
    plugins.register("extauthz.check", TableFactory())
    yield
    plugins.unregister("extauthz.check", "table")


def policy_dir(tmp: Path) -> str:
    folder = tmp / "policies"
    folder.mkdir(exist_ok=True)
    (folder / "policy.rego").write_text(POLICY)
    return str(folder)


@pytest.fixture
async def server(tmp_path: Path, table_plugin: object) -> AsyncIterator[CalloutServer]:
    running = await start_server(
        Settings(
            config=service_config(policy_dir(tmp_path)),
            registry=CollectorRegistry(),
            upstream_headers=UPSTREAM_HEADERS,
            client_headers=CLIENT_HEADERS,
        )
    )
    yield running
    await running.close()


async def exchange(port: int, data: bytes, *, wait: float = 5.0, first: float = 15.0) -> bytes:
    """Send ``data`` on a new connection, read until the server closes or pauses ``wait``
    seconds after it began to answer (the first bytes may take up to ``first`` seconds on a
    loaded machine: a short ``wait`` must not turn a slow answer into no answer)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    chunks = []
    try:
        while True:
            chunk = await asyncio.wait_for(reader.read(65536), wait if chunks else first)
            if not chunk:
                break
            chunks.append(chunk)
    except TimeoutError:
        pass
    except ConnectionResetError:
        pass
    finally:
        writer.close()
    return b"".join(chunks)
