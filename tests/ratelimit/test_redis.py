"""The Redis backend against real redis-servers: round trips, expiry, the over-limit cache,
Redis dying or freezing mid-run (failure mode honoured, nothing hangs), Redis Cluster."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import redis as redis_sync
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from prometheus_client import CollectorRegistry

from legation.ratelimit.algorithms import Hit
from legation.ratelimit.backends.redis import RedisBackend, RedisBackendFactory, RedisConfig
from legation.ratelimit.config import Algorithm, Limit
from legation.ratelimit.errors import RateLimitError
from legation.ratelimit.service import Settings, start_server
from tests.conftest import free_port
from tests.ratelimit.conftest import REDIS_SERVER, RedisServer, descriptor, request

pytestmark = [pytest.mark.redis, pytest.mark.either_loop]  # both loops, as served
T0 = 1_699_999_200_000
FIXED = Limit(unit="minute", requests_per_unit=2)
LIMITS = (
    "domain: d\ndescriptors:\n  - key: k\n    rate_limit: {unit: hour, requests_per_unit: 100}\n"
)


def backend_for(server: RedisServer, **kwargs: object) -> RedisBackend:
    options = {"url": server.url, "key_prefix": f"t{uuid.uuid4().hex}:", **kwargs}
    factory = RedisBackendFactory()
    return factory.create(factory.validate(options))


async def test_one_round_trip_per_request_and_keys_expire(redis_server: RedisServer) -> None:
    backend = backend_for(redis_server, timeout_ms=2000)
    hits = [
        Hit("a", FIXED, 1),
        Hit("b", Limit(unit="hour", requests_per_unit=5, algorithm=Algorithm.SLIDING_WINDOW), 1),
        Hit("c", Limit(unit="second", requests_per_unit=5, algorithm=Algorithm.TOKEN_BUCKET), 1),
    ]
    await backend.hit(hits, T0)  # the first call also loads the script
    before = backend.round_trips
    decisions = await backend.hit(hits, T0 + 1)
    assert backend.round_trips == before + 1
    assert all(d.allowed for d in decisions)
    client = redis_server.client()
    keys = client.keys(backend.config.key_prefix + "*")
    assert len(keys) == 3
    ttls = [client.pttl(k) for k in keys]
    assert all(0 < ttl <= 2 * 3600_000 + 1000 for ttl in ttls), ttls
    await backend.close()


async def test_over_limit_cache_skips_redis(redis_server: RedisServer) -> None:
    backend = backend_for(redis_server, timeout_ms=2000)
    for _ in range(3):
        await backend.hit([Hit("a", FIXED, 1)], T0)
    trips = backend.round_trips
    decisions = [await backend.hit([Hit("a", FIXED, 1)], T0 + 1000) for _ in range(5)]
    assert backend.round_trips == trips and backend.cache_hits == 5
    assert all(not d.allowed and d.reset_ms == 59_000 for (d,) in decisions)
    (fresh,) = await backend.hit([Hit("a", FIXED, 1)], T0 + 60_000)  # the window ended
    assert fresh.allowed and backend.round_trips == trips + 1
    await backend.close()


def test_password_never_shown() -> None:
    config = RedisBackendFactory().validate({"url": "redis://:s3cret@127.0.0.1:1/0"})
    assert "s3cret" not in repr(config) and "s3cret" not in config.redacted_url
    assert "s3cret" not in repr(RedisBackend(config))


@pytest.mark.parametrize(
    "raw, message",
    [
        ({}, "url: expected redis://"),
        ({"url": "http://x"}, "url: expected redis://"),
        ({"url": "redis://x", "timeout_ms": 0}, "timeout_ms: expected an integer >= 1"),
        ({"url": "redis://x", "timout_ms": 5}, "unknown option 'timout_ms'"),
    ],
)
def test_bad_options(raw: dict[str, object], message: str) -> None:
    with pytest.raises(Exception, match=message):
        RedisBackendFactory().validate(raw)


async def test_unreachable_store_raises_within_timeout(tmp_path: Path) -> None:
    config = RedisConfig(url=f"redis://:pw-123@127.0.0.1:{free_port()}/0", timeout_ms=100)
    backend = RedisBackend(config)
    with pytest.raises(RateLimitError) as info:
        await backend.hit([Hit("a", FIXED, 1)], T0)
    assert info.value.code == "backend_unavailable"
    assert "pw-123" not in str(info.value)
    await backend.close()


async def serve(server: RedisServer, tmp_path: Path, failure_mode: str):  # type: ignore[no-untyped-def]
    path = tmp_path / "limits.yaml"
    path.write_text(LIMITS)
    settings = Settings(
        config_files=(str(path),),
        reload_interval=0,
        backend="redis",
        backend_options={"url": server.url, "timeout_ms": 100},
        failure_mode=failure_mode,
        registry=CollectorRegistry(),
    )
    grpc_server, port = await start_server(settings)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    return grpc_server, channel, rls_pb2_grpc.RateLimitServiceStub(channel)


@pytest.mark.parametrize("how", ["kill", "freeze"])
@pytest.mark.parametrize("failure_mode", ["allow", "deny"])
async def test_store_lost_mid_run_honours_failure_mode(
    tmp_path: Path, failure_mode: str, how: str
) -> None:
    redis_server = RedisServer(tmp_path)
    grpc_server, channel, stub = await serve(redis_server, tmp_path, failure_mode)
    req = request("d", descriptor(("k", "a")))
    try:
        ok = await stub.ShouldRateLimit(req, timeout=5)
        assert ok.statuses[0].limit_remaining == 99  # Redis answered
        if how == "kill":
            redis_server.stop()
        else:
            os.kill(redis_server.proc.pid, signal.SIGSTOP)
        for _ in range(3):  # the 2 s deadline is the "nothing hangs" guard, far above 100 ms
            if failure_mode == "allow":
                resp = await stub.ShouldRateLimit(req, timeout=2)
                assert resp.overall_code == rls_pb2.RateLimitResponse.OK
                assert not resp.statuses
            else:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.ShouldRateLimit(req, timeout=2)
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        metrics = grpc_server.legation_limiter.metrics
        assert metrics.failure_mode.labels(failure_mode)._value.get() == 3
        assert metrics.backend_errors.labels("backend_unavailable")._value.get() == 3
    finally:
        if how == "freeze" and redis_server.proc.poll() is None:
            os.kill(redis_server.proc.pid, signal.SIGCONT)
        await channel.close()
        await grpc_server.stop(None)
        redis_server.stop()


# -- Redis Cluster: three masters on loopback -------------------------------------------------


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[int]]:
    if REDIS_SERVER is None:
        pytest.skip("redis-server not installed")
    procs, ports = [], []
    try:
        for _ in range(3):
            port, bus = free_port(), free_port()
            workdir = tmp_path_factory.mktemp(f"cluster{port}")
            procs.append(
                subprocess.Popen(
                    [
                        REDIS_SERVER,
                        "--port",
                        str(port),
                        "--cluster-port",
                        str(bus),
                        "--bind",
                        "127.0.0.1",
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        str(workdir / "nodes.conf"),
                        "--save",
                        "",
                        "--appendonly",
                        "no",
                        "--dir",
                        str(workdir),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
            ports.append(port)
        for port in ports:
            _wait_ping(port)
        subprocess.run(
            [
                "redis-cli",
                "--cluster",
                "create",
                *(f"127.0.0.1:{p}" for p in ports),
                "--cluster-yes",
            ],
            check=True,
            capture_output=True,
            timeout=30,
        )
        deadline = time.monotonic() + 20
        while not _cluster_ok(ports[0]):
            if time.monotonic() > deadline:
                pytest.fail("redis cluster did not become ok")
            time.sleep(0.1)
        yield ports
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(5)


def _cluster_ok(port: int) -> bool:
    info = redis_sync.Redis(port=port, decode_responses=True).execute_command("CLUSTER INFO")
    text = info if isinstance(info, str) else "\n".join(f"{k}:{v}" for k, v in info.items())
    return "cluster_state:ok" in text


def _wait_ping(port: int) -> None:
    deadline = time.monotonic() + 10
    while True:
        try:
            redis_sync.Redis(port=port, socket_timeout=0.5).ping()
            return
        except redis_sync.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


@pytest.mark.slow
async def test_cluster_counts_across_slots(redis_cluster: list[int]) -> None:
    backend = RedisBackend(
        RedisConfig(
            url=f"redis://127.0.0.1:{redis_cluster[0]}/0",
            cluster=True,
            timeout_ms=2000,
            key_prefix=f"c{uuid.uuid4().hex}:",
        )
    )
    limits = [Limit(unit="minute", requests_per_unit=3, algorithm=a) for a in Algorithm]
    hits = [Hit(f"user{i}", limit, 1) for i in range(12) for limit in limits]
    try:
        for _ in range(3):
            assert all(d.allowed for d in await backend.hit(hits, T0))
        assert not any(d.allowed for d in await backend.hit(hits, T0))
        # the keys really are spread over the masters
        counts = [redis_sync.Redis(port=p).dbsize() for p in redis_cluster]
        assert sum(1 for c in counts if c) >= 2, counts
    finally:
        await backend.close()
