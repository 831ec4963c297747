"""The servicer over a real gRPC connection (no Envoy): bad input gets a well-formed answer."""

from __future__ import annotations

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from prometheus_client import CollectorRegistry

from legation.errors import ConfigError
from legation.extproc.config import CHAIN_METADATA_KEY, build_chains
from legation.extproc.service import Settings, start_server

pytestmark = pytest.mark.either_loop  # on asyncio's loop and on uvloop, as served

CHAINS = {
    "default_chain": "web",
    "chains": {
        "web": {
            "filters": [
                {"name": "request_id", "options": {"header": "x-cid"}},
                {"name": "headers", "options": {"response": {"set": {"x-r": "1"}}}},
            ]
        },
        "deny": {"filters": [{"name": "t_answer"}]},
    },
}


def _headers(**values: str) -> pb.HttpHeaders:
    msg = pb.HttpHeaders()
    for k, v in values.items():
        header = base_pb2.HeaderValue(key=k.replace("_", "-"), raw_value=v.encode())
        msg.headers.headers.append(header)
    return msg


@pytest.fixture
async def client():
    registry = CollectorRegistry()
    server, port = await start_server(
        Settings(port=0, chains=build_chains(CHAINS), registry=registry)
    )
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield pb_grpc.ExternalProcessorStub(channel), registry
    finally:
        await channel.close()
        await server.stop(0)


async def test_a_request_through_two_phases(client):
    stub, registry = client
    call = stub.Process()
    headers = _headers(**{":path": "/", "x_cid": "k1"})
    await call.write(pb.ProcessingRequest(request_headers=headers))
    first = await call.read()
    assert first.WhichOneof("response") == "request_headers"
    assert (
        first.dynamic_metadata.fields["legation.extproc"]
        .struct_value.fields["request_id"]
        .string_value
        == "k1"
    )
    await call.write(pb.ProcessingRequest(response_headers=_headers(**{":status": "200"})))
    second = await call.read()
    sets = {
        h.header.key: h.header.raw_value
        for h in second.response_headers.response.header_mutation.set_headers
    }
    assert sets == {"x-cid": b"k1", "x-r": b"1"}
    await call.done_writing()
    assert await call.code() == grpc.StatusCode.OK
    assert registry.get_sample_value("legation_extproc_streams_total", {"chain": "web"}) == 1


async def test_a_message_with_no_phase_gets_a_500_answer_and_the_stream_goes_on(client):
    stub, registry = client
    call = stub.Process()
    await call.write(pb.ProcessingRequest())
    answer = await call.read()
    assert answer.immediate_response.status.code == 500
    await call.write(pb.ProcessingRequest(request_headers=_headers(**{":path": "/"})))
    assert (await call.read()).WhichOneof("response") == "request_headers"
    await call.done_writing()
    assert (
        registry.get_sample_value(
            "legation_extproc_errors_total", {"filter": "-", "code": "malformed_request"}
        )
        == 1
    )


async def test_unknown_chain_gets_a_500_answer(client):
    stub, _ = client
    call = stub.Process(metadata=((CHAIN_METADATA_KEY, "nope"),))
    await call.write(pb.ProcessingRequest(request_headers=_headers(**{":path": "/"})))
    answer = await call.read()
    assert answer.immediate_response.status.code == 500
    assert answer.immediate_response.details == "legation_unknown_chain"


async def test_immediate_answer_ends_the_stream(client):
    stub, registry = client
    call = stub.Process(metadata=((CHAIN_METADATA_KEY, "deny"),))
    await call.write(pb.ProcessingRequest(request_headers=_headers(x_deny="1")))
    answer = await call.read()
    assert answer.immediate_response.status.code == 403
    assert await call.code() == grpc.StatusCode.OK
    assert (
        registry.get_sample_value(
            "legation_extproc_immediate_responses_total", {"chain": "deny", "status": "403"}
        )
        == 1
    )


async def test_settings_need_chains():
    with pytest.raises(ConfigError, match="config_file or chains"):
        await start_server(Settings(port=0))


async def test_each_stream_is_counted_once_with_or_without_messages(client):
    """A stream is counted with its first message (one queued update with the phase and the
    filters' times), or on its own when it ends before any message reached the chain."""
    stub, registry = client
    for messages in (0, 1, 2):
        call = stub.Process()
        for _ in range(messages):
            headers = _headers(**{":path": "/", "x_cid": "k"})
            await call.write(pb.ProcessingRequest(request_headers=headers))
            await call.read()
        await call.done_writing()
        assert await call.code() == grpc.StatusCode.OK
    assert registry.get_sample_value("legation_extproc_streams_total", {"chain": "web"}) == 3
    phases = {"chain": "web", "phase": "request_headers"}
    assert registry.get_sample_value("legation_extproc_phases_total", phases) == 3
