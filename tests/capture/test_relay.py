"""The relay on loopback: bytes both ways, and following a reload's targets."""

from __future__ import annotations

import asyncio

from legation.capture.relay import Relay
from tests.conftest import distinct_ports


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(await reader.read(100))
    await writer.drain()
    writer.close()


async def _ask(port: int) -> bytes | None:
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return None
    writer.write(b"ping")
    await writer.drain()
    answer = await reader.read(100)
    writer.close()
    return answer


def test_the_relay_copies_both_ways_and_follows_its_targets() -> None:
    p = distinct_ports("one", "two")

    async def run() -> list[bytes | None]:
        # the relay listens on the ports it relays, so the echo servers sit on 127.0.0.2
        servers = [await asyncio.start_server(_echo, "127.0.0.2", port) for port in p.values()]
        relay = await Relay("127.0.0.1", [("127.0.0.2", p["one"])]).start()
        try:
            seen = [await _ask(p["one"]), await _ask(p["two"])]
            await relay.follow([("127.0.0.2", p["two"])])
            seen += [await _ask(p["one"]), await _ask(p["two"])]
        finally:
            await relay.stop()
            for s in servers:
                s.close()
        return seen

    assert asyncio.run(run()) == [b"ping", None, None, b"ping"]
