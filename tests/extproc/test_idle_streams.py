"""The open streams' idle timeouts share one loop timer (``servicer._IdleSweep``): each idle
stream must still end on its own, and a stream that keeps sending must not be ended with them.
Real gRPC on loopback, a client talking to the service directly (as test_hardening_integration's
idle test)."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from prometheus_client import CollectorRegistry

from legation.extproc.chain import Chain
from legation.extproc.config import CHAIN_METADATA_KEY, Chains, build_chains
from legation.extproc.exchange import Exchange
from legation.extproc.sdk import BodyMode, Phase
from legation.extproc.service import Settings, servicer_of, start_server

pytestmark = pytest.mark.either_loop  # on asyncio's loop and on uvloop, as served

CHAINS = {
    "chains": {
        "route": {
            "filters": [
                {
                    "name": "header_route",
                    "options": {
                        "header": "x-cohort",
                        "default": "stable",
                        "rules": [{"header": "x-beta", "present": True, "value": "canary"}],
                    },
                }
            ]
        }
    }
}


def _message() -> pb.ProcessingRequest:
    req = pb.ProcessingRequest()
    req.request_headers.headers.headers.append(base_pb2.HeaderValue(key=":path", raw_value=b"/"))
    return req


async def _stream(stub: pb_grpc.ExternalProcessorStub, sends: int, gap: float) -> tuple[int, str]:
    """Send ``sends`` messages ``gap`` seconds apart, then half-close if ``gap`` (an active
    stream), else hold the stream open sending nothing; the answers read and how it ended."""
    call = stub.Process(metadata=((CHAIN_METADATA_KEY, "route"),), timeout=20)
    answers = 0
    try:
        for _ in range(sends):
            await call.write(_message())
            await call.read()
            answers += 1
            await asyncio.sleep(gap)
        if gap:
            await call.done_writing()
        return answers, (await call.code()).name
    except grpc.aio.AioRpcError as e:
        return answers, e.code().name


async def test_idle_streams_end_one_by_one_and_an_active_one_goes_on() -> None:
    registry = CollectorRegistry()
    server, port = await start_server(
        Settings(chains=build_chains(CHAINS), registry=registry, stream_idle_timeout=0.4)
    )
    ended: list[str] = []

    async def run(name: str, sends: int, gap: float) -> tuple[int, str]:
        result = await _stream(stub, sends, gap)
        ended.append(name)
        return result

    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.ExternalProcessorStub(channel)
            # a message every 0.1 s for ~2 s: opened first, so the oldest of the timers' streams
            active = asyncio.create_task(run("active", 20, 0.1))
            await asyncio.sleep(0.15)
            idle = await asyncio.wait_for(
                asyncio.gather(run("none", 0, 0), run("one", 1, 0), run("two", 2, 0)), 15
            )
            assert await asyncio.wait_for(active, 15) == (20, "OK")
    finally:
        await server.stop(None)
    assert idle == [(0, "DEADLINE_EXCEEDED"), (1, "DEADLINE_EXCEEDED"), (2, "DEADLINE_EXCEEDED")]
    # each idle stream ended on its own time, not behind the active stream opened before it
    assert ended[-1] == "active"
    errors = registry.get_sample_value(
        "legation_extproc_errors_total", {"filter": "-", "code": "stream_idle_timeout"}
    )
    assert errors == 3


async def test_a_stream_quiet_for_less_than_the_idle_timeout_is_never_ended() -> None:
    """The sweep ends a stream between idle and 1.25 x idle without a message, never sooner:
    gaps of three quarters of the timeout, longer than a sweep's interval, must not end it."""
    registry = CollectorRegistry()
    server, port = await start_server(
        Settings(chains=build_chains(CHAINS), registry=registry, stream_idle_timeout=0.4)
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.ExternalProcessorStub(channel)
            assert await asyncio.wait_for(_stream(stub, 6, 0.3), 15) == (6, "OK")
    finally:
        await server.stop(None)
    assert not registry.get_sample_value(
        "legation_extproc_errors_total", {"filter": "-", "code": "stream_idle_timeout"}
    )


async def test_a_stream_the_client_cancels_is_not_an_idle_timeout() -> None:
    """Only the sweep's own cancellation becomes DEADLINE_EXCEEDED and the idle metric; a
    stream cancelled otherwise (the client went away) ends as cancelled, uncounted."""
    registry = CollectorRegistry()
    server, port = await start_server(
        Settings(chains=build_chains(CHAINS), registry=registry, stream_idle_timeout=30)
    )
    servicer = servicer_of(server)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.ExternalProcessorStub(channel)
            call = stub.Process(metadata=((CHAIN_METADATA_KEY, "route"),), timeout=20)
            await call.write(_message())
            await call.read()
            call.cancel()
            for _ in range(100):  # the server's side of the stream ends
                if not any(s.streams for s in servicer._sweeps.values()):
                    break
                await asyncio.sleep(0.05)
            assert not any(s.streams for s in servicer._sweeps.values())
    finally:
        await server.stop(None)
    assert not registry.get_sample_value(
        "legation_extproc_errors_total", {"filter": "-", "code": "stream_idle_timeout"}
    )


class _Swallows:
    """An async hook that swallows the first cancellation it gets (as a careless plugin's
    ``except BaseException`` would), then answers."""

    name = "t_swallow"
    phases = frozenset({Phase.REQUEST_HEADERS})
    body_mode = BodyMode.BUFFERED

    def __init__(self) -> None:
        self.swallowed = 0  # this instance's: the test runs once per loop

    async def on_request_headers(self, ex: Exchange) -> None:
        try:
            await asyncio.sleep(3)
        except asyncio.CancelledError:
            self.swallowed += 1


async def test_a_stream_whose_hook_swallows_the_idle_cancellation_still_ends() -> None:
    """The sweep cancels an idle stream again at each sweep until it ends: a hook that
    swallowed the first cannot keep its stream (and exchange) open."""
    swallows = _Swallows()
    chain = Chain(name="swallow", filters=[swallows], message_timeout=5.0)
    server, port = await start_server(
        Settings(
            chains=Chains(chains={"swallow": chain}),
            registry=CollectorRegistry(),
            stream_idle_timeout=0.4,
        )
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = pb_grpc.ExternalProcessorStub(channel).Process(
                metadata=((CHAIN_METADATA_KEY, "swallow"),), timeout=20
            )
            await call.write(_message())
            answer = await asyncio.wait_for(call.read(), 5)  # after the swallowed cancel
            assert answer.HasField("request_headers")
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await asyncio.wait_for(call.read(), 5)  # then nothing more is sent
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        await server.stop(None)
    assert swallows.swallowed == 1
