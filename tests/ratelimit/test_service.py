"""The gRPC service through a real grpc.aio channel: answers, malformed requests, hot reload."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from prometheus_client import CollectorRegistry

from legation.errors import ConfigError
from legation.ratelimit.service import Settings, start_server
from tests.ratelimit.conftest import descriptor, request

LIMITS = (
    "domain: d\ndescriptors:\n  - key: k\n    rate_limit: {unit: hour, requests_per_unit: %d}\n"
)


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "limits.yaml"
    path.write_text(LIMITS % 2)
    return path


@pytest.fixture
async def service(config_file: Path) -> AsyncIterator[tuple[grpc.aio.Server, object]]:
    settings = Settings(
        port=0, config_files=(str(config_file),), reload_interval=0.05, registry=CollectorRegistry()
    )
    server, port = await start_server(settings)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    yield server, rls_pb2_grpc.RateLimitServiceStub(channel)
    await channel.close()
    await server.stop(None)


async def test_answers_over_grpc(service) -> None:  # type: ignore[no-untyped-def]
    _, stub = service
    req = request("d", descriptor(("k", "a")))
    codes = [(await stub.ShouldRateLimit(req, timeout=5)).overall_code for _ in range(3)]
    assert codes == [rls_pb2.RateLimitResponse.OK] * 2 + [rls_pb2.RateLimitResponse.OVER_LIMIT]


async def test_malformed_request_gets_invalid_argument(service) -> None:  # type: ignore[no-untyped-def]
    _, stub = service
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.ShouldRateLimit(request("d"), timeout=5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "descriptor list must not be empty" in (info.value.details() or "")
    ok = await stub.ShouldRateLimit(request("d", descriptor(("k", "a"))), timeout=5)
    assert ok.overall_code == rls_pb2.RateLimitResponse.OK  # still serving


async def test_hot_reload_applies_good_and_keeps_last_good(
    service,
    config_file: Path,
    caplog: pytest.LogCaptureFixture,  # type: ignore[no-untyped-def]
) -> None:
    server, stub = service
    limiter, watcher = server.legation_limiter, server.legation_watcher
    reloads = limiter.metrics.config_reloads
    config_file.write_text(LIMITS % 50)
    for _ in range(200):  # the background poll picks it up (bounded wait)
        if limiter.config.domains["d"].descriptors.any_value["k"].limits[0].requests_per_unit == 50:
            break
        await asyncio.sleep(0.02)
    resp = await stub.ShouldRateLimit(request("d", descriptor(("k", "b"))), timeout=5)
    assert resp.statuses[0].current_limit.requests_per_unit == 50
    # a bad file: the running config stays, the error names the file and field, a counter rises
    await watcher.stop()
    before = reloads.labels("error")._value.get()
    config_file.write_text(LIMITS.replace("hour", "fortnight") % 7)
    with caplog.at_level(logging.ERROR, logger="legation.ratelimit.watch"):
        assert watcher.check() is False
    assert watcher.check() is None  # the same bad bytes are not retried
    assert reloads.labels("error")._value.get() == before + 1
    assert f"{config_file}: descriptors[0].rate_limit.unit: invalid rate limit unit" in caplog.text
    resp = await stub.ShouldRateLimit(request("d", descriptor(("k", "c"))), timeout=5)
    assert resp.statuses[0].current_limit.requests_per_unit == 50
    config_file.unlink()
    assert watcher.check() is False
    config_file.write_text(LIMITS % 9)
    assert watcher.check() is True
    assert limiter.config.domains["d"].descriptors.any_value["k"].limits[0].requests_per_unit == 9


async def test_bad_config_fails_the_start(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("domain: d\ndescriptors:\n  - key: k\n    rate_limt: {}\n")
    with pytest.raises(ConfigError, match=rf"^{bad}: descriptors\[0\]: unknown key 'rate_limt'"):
        await start_server(Settings(config_files=(str(bad),), registry=CollectorRegistry()))


def test_settings_reject_an_unknown_failure_mode() -> None:
    with pytest.raises(ConfigError, match="failure_mode"):
        Settings(failure_mode="maybe")


async def test_unknown_backend_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"unknown ratelimit\.backend plugin 'etcd'"):
        await start_server(Settings(backend="etcd", registry=CollectorRegistry()))
