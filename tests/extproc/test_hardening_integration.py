"""Hostile or broken peers of the ext_proc service (issue 9): streams held open, synchronous filters
that block, JSON the redactor used to skip. Through the real Envoy, except the idle stream, which is
a client talking to the service directly (as an attacker reaching the port would)."""

from __future__ import annotations

import asyncio
import gzip
import threading
import uuid
import zlib
from collections.abc import Iterator

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from prometheus_client import CollectorRegistry

from legation.errors import ConfigError
from legation.extproc.config import CHAIN_METADATA_KEY
from legation.extproc.service import Settings, start_server
from tests.extproc import harness
from tests.extproc.filters_for_tests import Blocks

pytestmark = pytest.mark.integration


# -- stream idle timeout --------------------------------------------------------------------------


@pytest.fixture
def idle_service(stack) -> Iterator[tuple[harness.ServiceThread, CollectorRegistry]]:
    registry = CollectorRegistry()
    service = harness.ServiceThread(
        Settings(
            chains=stack.chains, registry=registry, message_timeout=0.3, stream_idle_timeout=0.5
        )
    ).start()
    yield service, registry
    service.stop()


def _headers_message() -> pb.ProcessingRequest:
    req = pb.ProcessingRequest()
    req.request_headers.headers.headers.append(base_pb2.HeaderValue(key=":path", raw_value=b"/"))
    return req


@pytest.mark.parametrize("first_messages", [0, 1])
def test_a_stream_held_open_is_ended_after_the_idle_timeout(idle_service, first_messages):
    service, registry = idle_service
    hold = threading.Event()

    def requests() -> Iterator[pb.ProcessingRequest]:
        for _ in range(first_messages):
            yield _headers_message()
        hold.wait(20)  # then send nothing, and never half-close

    channel = grpc.insecure_channel(f"127.0.0.1:{service.port}")
    try:
        call = pb_grpc.ExternalProcessorStub(channel).Process(
            requests(), metadata=((CHAIN_METADATA_KEY, "headers"),), timeout=20
        )
        answers = 0
        with pytest.raises(grpc.RpcError) as info:
            for _ in call:
                answers += 1
        assert answers == first_messages
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert info.value.details() == "stream idle timeout"  # the server's, not the client's
    finally:
        hold.set()
        channel.close()
    assert (
        registry.get_sample_value(
            "legation_extproc_errors_total", {"filter": "-", "code": "stream_idle_timeout"}
        )
        == 1
    )


def test_idle_timeout_must_be_positive(stack):
    with pytest.raises(ConfigError, match="stream_idle_timeout must be positive"):
        asyncio.run(start_server(Settings(chains=stack.chains, stream_idle_timeout=0)))


# -- synchronous filters under the deadline -------------------------------------------------------


def _blocked_request(stack, path: str, out: list[harness.Response]) -> threading.Thread:
    Blocks.entered.clear()
    Blocks.release.clear()
    t = threading.Thread(target=lambda: out.append(stack.get(path)), daemon=True)
    t.start()
    assert Blocks.entered.wait(10)
    return t


def test_a_blocking_sync_filter_fails_closed_at_the_deadline_and_stalls_nobody(stack):
    errors = stack.metric("legation_extproc_errors_total", filter="t_block", code="message_timeout")
    returned = Blocks.returned
    out: list[harness.Response] = []
    t = _blocked_request(stack, f"/block/{uuid.uuid4().hex}", out)
    try:
        # the hook is still blocked: other streams on the service's loop are answered meanwhile
        r = stack.get("/headers-echo/x", method="POST", body=b"{}")
        assert r.status == 200 and r.json()["headers"]["x-env"] == "test"
        t.join(10)
        assert out and out[0].status == 500  # the deadline held: fail closed (chain default)
        assert Blocks.returned == returned  # ... while the hook had not returned
    finally:
        Blocks.release.set()
        t.join(10)
    assert (
        stack.metric("legation_extproc_errors_total", filter="t_block", code="message_timeout")
        == errors + 1
    )


def test_a_blocking_sync_filter_on_a_fail_open_chain_passes_without_its_late_mutation(stack):
    out: list[harness.Response] = []
    t = _blocked_request(stack, f"/block-open/{uuid.uuid4().hex}", out)
    try:
        t.join(10)
        assert out and out[0].status == 200
        assert "x-late" not in out[0].json()["headers"]
    finally:
        Blocks.release.set()
        t.join(10)


# -- body_redact: +json and compressed bodies -----------------------------------------------------

SECRET = {"authorization": "Bearer secret-token", "x-secret": "hunter2"}


@pytest.mark.parametrize(
    "ctype",
    ["application/problem+json", "application/vnd.api+json", "application/json; charset=utf-8"],
)
def test_body_redact_masks_json_suffix_types(stack, ctype):
    r = stack.get("/redact-echo/x", headers={**SECRET, "x-echo-content-type": ctype})
    assert r.status == 200
    assert r.headers["content-type"] == ctype
    assert b"secret-token" not in r.body and b"hunter2" not in r.body
    assert r.json()["headers"]["authorization"] == "***"


@pytest.mark.parametrize(
    ("encoding", "decode"), [("gzip", gzip.decompress), ("deflate", zlib.decompress)]
)
def test_body_redact_masks_compressed_json(stack, encoding, decode):
    r = stack.get(
        "/redact-echo/x",
        headers={**SECRET, "x-echo-encoding": encoding, "accept-encoding": encoding},
    )
    assert r.status == 200
    assert r.headers["content-encoding"] == encoding
    body = decode(r.body)
    assert b"secret-token" not in body and b"hunter2" not in body
    assert int(r.headers["content-length"]) == len(r.body)


@pytest.mark.parametrize("encoding", ["br", "gzip-bomb"])
def test_body_redact_refuses_what_it_cannot_read(stack, encoding):
    """Brotli (no decoder here) and a gzip body inflating past the bound: 502, never the body."""
    r = stack.get("/redact-echo/x", headers={**SECRET, "x-echo-encoding": encoding})
    assert r.status == 502
    assert b"secret" not in r.body and b"hunter2" not in r.body
