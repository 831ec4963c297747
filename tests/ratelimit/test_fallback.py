"""``failure_mode: local``: the in-memory fallback while the store is away (a scripted store and a
hand-moved clock), and the same against a real redis-server killed and restarted."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from pathlib import Path

import grpc
import pytest
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from prometheus_client import CollectorRegistry

from legation.errors import ConfigError
from legation.ratelimit.algorithms import Decision, Hit
from legation.ratelimit.backends.memory import MemoryBackend
from legation.ratelimit.config import Algorithm, Limit
from legation.ratelimit.errors import RateLimitError
from legation.ratelimit.fallback import LocalFallback
from legation.ratelimit.metrics import RateLimitMetrics
from legation.ratelimit.service import RateLimitServicer, Settings, start_server
from tests.ratelimit import conftest
from tests.ratelimit.conftest import RedisServer, descriptor, make_limiter, needs_redis, request

T0 = 1_699_999_200_000
PER_MINUTE = Limit(unit="minute", requests_per_unit=5)
OK = rls_pb2.RateLimitResponse.OK
OVER = rls_pb2.RateLimitResponse.OVER_LIMIT


class Store:
    """A store that answers from memory while ``up``, else raises ``backend_unavailable``;
    ``gate`` (when set) holds each call until released."""

    def __init__(self) -> None:
        self.up = True
        self.calls = 0
        self.gate: asyncio.Event | None = None
        self.counted = MemoryBackend()

    async def hit(self, hits: Sequence[Hit], now_ms: int) -> list[Decision]:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        if not self.up:
            raise RateLimitError("store: no answer in time", code="backend_unavailable")
        return await self.counted.hit(hits, now_ms)

    async def close(self) -> None:
        pass


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def fallback(store: Store, **kwargs: object) -> tuple[LocalFallback, Clock, RateLimitMetrics]:
    clock, metrics = Clock(), RateLimitMetrics(CollectorRegistry())
    return LocalFallback(store, metrics=metrics, monotonic=clock, **kwargs), clock, metrics  # type: ignore[arg-type]


def local_count(metrics: RateLimitMetrics) -> float:
    return (
        metrics.registry.get_sample_value(
            "legation_ratelimit_failure_mode_total", {"action": "local"}
        )
        or 0.0
    )


async def allowed(
    backend: LocalFallback, key: str, limit: Limit, n: int, now_ms: int = T0
) -> list[bool]:
    return [(await backend.hit([Hit(key, limit, 1)], now_ms))[0].allowed for _ in range(n)]


async def test_store_up_counts_there_and_memory_stays_empty() -> None:
    store = Store()
    backend, _, metrics = fallback(store)
    assert await allowed(backend, "k", PER_MINUTE, 7) == [True] * 5 + [False] * 2
    assert store.calls == 7 and len(backend.local) == 0
    assert local_count(metrics) == 0 and backend.available


async def test_outage_decides_locally_with_the_same_limit_and_leaves_the_store_alone() -> None:
    store = Store()
    backend, _, metrics = fallback(store)
    store.up = False
    assert await allowed(backend, "k", PER_MINUTE, 8) == [True] * 5 + [False] * 3
    assert store.calls == 1  # the failing call; the rest waited for the backoff, in memory
    assert not backend.available
    assert local_count(metrics) == 8
    assert (
        metrics.registry.get_sample_value(
            "legation_ratelimit_backend_errors_total", {"code": "backend_unavailable"}
        )
        == 1
    )


@pytest.mark.parametrize(("instances", "per_instance"), [(1, 10), (3, 4), (10, 1), (25, 1)])
async def test_local_limits_are_divided_among_instances(instances: int, per_instance: int) -> None:
    store = Store()
    store.up = False
    backend, _, _ = fallback(store, instances=instances)
    limit = Limit(unit="second", requests_per_unit=10)
    got = await allowed(backend, "k", limit, 12)
    assert got.count(True) == per_instance  # rounded up: never 0 from a limit of 1 or more


@pytest.mark.parametrize("algorithm", list(Algorithm))
async def test_every_algorithm_holds_locally(algorithm: Algorithm) -> None:
    store = Store()
    store.up = False
    backend, _, _ = fallback(store, instances=2)
    limit = Limit(unit="hour", requests_per_unit=6, algorithm=algorithm)
    assert (await allowed(backend, "k", limit, 5)).count(True) == 3


async def test_one_probe_after_the_backoff_then_back_to_the_store() -> None:
    store = Store()
    backend, clock, _ = fallback(store, probe_interval=0.25)
    store.up = False
    await allowed(backend, "k", PER_MINUTE, 3)
    assert store.calls == 1
    store.up = True
    await allowed(backend, "k", PER_MINUTE, 3)
    assert store.calls == 1  # the backoff has not passed: still local
    clock.now += 0.3
    store.gate = asyncio.Event()
    probe = asyncio.ensure_future(backend.hit([Hit("k", PER_MINUTE, 1)], T0))
    await asyncio.sleep(0)
    assert store.calls == 2  # the probe is waiting on the store ...
    await allowed(backend, "k", PER_MINUTE, 4)  # ... the others do not join it
    assert store.calls == 2
    store.gate.set()
    assert (await probe)[0].allowed
    assert backend.available
    store.gate = None
    before = store.calls
    await allowed(backend, "k", PER_MINUTE, 3)
    assert store.calls == before + 3  # counting is back in the store
    # the store's window carries on from its own count (the probe and these 3), not the local one
    assert await allowed(backend, "k", PER_MINUTE, 2) == [True, False]


async def test_failed_probes_double_the_backoff_up_to_the_bound() -> None:
    store = Store()
    backend, clock, _ = fallback(store, probe_interval=0.25, max_probe_interval=1.0)
    store.up = False
    await allowed(backend, "k", PER_MINUTE, 1)
    calls = []
    for step in (0.25, 0.5, 1.0, 1.0):  # each waits exactly the backoff then probes once
        clock.now += step - 0.01
        await allowed(backend, "k", PER_MINUTE, 1)
        calls.append(store.calls)
        clock.now += 0.01
        await allowed(backend, "k", PER_MINUTE, 2)
        calls.append(store.calls)
    assert calls == [1, 2, 2, 3, 3, 4, 4, 5]


async def test_a_late_answer_from_before_the_failure_does_not_end_the_outage() -> None:
    store = Store()
    backend, _, _ = fallback(store)
    store.gate = gate = asyncio.Event()
    early = asyncio.ensure_future(backend.hit([Hit("k", PER_MINUTE, 1)], T0))
    await asyncio.sleep(0)  # sent while the store was up; its answer is late
    store.gate, store.up = None, False
    await allowed(backend, "k", PER_MINUTE, 1)  # fails: the outage starts
    store.up = True
    gate.set()
    assert (await early)[0].allowed
    assert not backend.available  # only a probe ends it
    calls = store.calls
    await allowed(backend, "k", PER_MINUTE, 2)
    assert store.calls == calls


async def test_a_counter_the_store_had_over_stays_refused_in_memory() -> None:
    class Remembers(Store):
        def cached_refusal(self, key: str, now_ms: int) -> Decision | None:
            return Decision(False, 0, 1000, 1000) if key == "hot" and now_ms < T0 + 1000 else None

    store = Remembers()
    backend, _, _ = fallback(store)
    store.up = False
    assert await allowed(backend, "hot", PER_MINUTE, 3) == [False] * 3  # Redis said: over
    assert await allowed(backend, "cold", PER_MINUTE, 6) == [True] * 5 + [False]
    assert await allowed(backend, "hot", PER_MINUTE, 6, now_ms=T0 + 1000) == [True] * 5 + [False]


async def test_other_errors_are_not_swallowed() -> None:
    class Broken(Store):
        async def hit(self, hits: Sequence[Hit], now_ms: int) -> list[Decision]:
            raise RateLimitError("bad", code="invalid_request")

    backend, _, _ = fallback(Broken())
    with pytest.raises(RateLimitError) as info:
        await backend.hit([Hit("k", PER_MINUTE, 1)], T0)
    assert info.value.code == "invalid_request"


def test_servicer_wraps_and_unwraps_the_backend_with_the_mode() -> None:
    store = Store()
    limiter = make_limiter("domain: d\ndescriptors: []\n", backend=store)
    servicer = RateLimitServicer(limiter, failure_mode="local", local_instances=3)
    assert isinstance(limiter.backend, LocalFallback) and limiter.backend.store is store
    assert limiter.backend.instances == 3
    servicer.local_instances = 2
    servicer.failure_mode = "local"  # a reload: same wrapper, new share
    assert isinstance(limiter.backend, LocalFallback) and limiter.backend.instances == 2
    servicer.failure_mode = "deny"
    assert limiter.backend is store
    servicer.failure_mode = "allow"
    assert limiter.backend is store


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"failure_mode": "local-ish"},
            "ratelimit settings: failure_mode: expected one of allow, deny, local, got 'local-ish'",
        ),
        (
            {"failure_mode": "local", "local_instances": 0},
            "ratelimit settings: local_instances: expected an integer >= 1, got 0",
        ),
    ],
)
def test_bad_settings(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings(**kwargs)  # type: ignore[arg-type]
    assert str(info.value) == message


# -- against a real redis-server ------------------------------------------------------------

LIMITS = "domain: d\ndescriptors:\n  - key: k\n    rate_limit: {unit: hour, requests_per_unit: 4}\n"


def _metric(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(f"legation_ratelimit_{name}", labels) or 0.0


def _restart(server: RedisServer, tmp: Path) -> RedisServer:
    """A new redis-server on the stopped one's port (the service keeps its URL)."""
    port = server.port
    original = conftest.free_port
    conftest.free_port = lambda: port  # type: ignore[assignment]
    try:
        return RedisServer(tmp)
    finally:
        conftest.free_port = original  # type: ignore[assignment]


@needs_redis
@pytest.mark.redis
async def test_redis_killed_and_restarted_local_limits_then_counting_resumes(
    tmp_path: Path,
) -> None:
    redis_server = RedisServer(tmp_path)
    path = tmp_path / "limits.yaml"
    path.write_text(LIMITS)
    registry = CollectorRegistry()
    prefix = f"t{uuid.uuid4().hex}:"
    settings = Settings(
        config_files=(str(path),),
        reload_interval=0,
        backend="redis",
        backend_options={"url": redis_server.url, "timeout_ms": 100, "key_prefix": prefix},
        failure_mode="local",
        registry=registry,
    )
    grpc_server, port = await start_server(settings)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    stub = rls_pb2_grpc.RateLimitServiceStub(channel)

    async def codes(user: str, n: int) -> list[int]:
        req = request("d", descriptor(("k", user)))
        return [(await stub.ShouldRateLimit(req, timeout=2)).overall_code for _ in range(n)]

    try:
        assert await codes("a", 2) == [OK, OK]  # counted in Redis
        assert _metric(registry, "backend_available") == 1
        redis_server.stop()
        assert await codes("b", 6) == [OK] * 4 + [OVER] * 2  # the hourly 4, held in memory
        assert _metric(registry, "failure_mode_total", action="local") == 6
        assert _metric(registry, "backend_available") == 0
        restarted = _restart(redis_server, tmp_path)
        try:
            answered = False
            for _ in range(200):  # bounded: the probe backoff is 0.25 s
                await asyncio.sleep(0.02)
                await codes("c", 1)
                answered = _metric(registry, "backend_available") == 1
                if answered:
                    break
            assert answered
            local = _metric(registry, "failure_mode_total", action="local")
            assert await codes("d", 5) == [OK] * 4 + [OVER]
            assert _metric(registry, "failure_mode_total", action="local") == local
            assert restarted.client().keys(prefix + "*")  # counted in the restarted Redis
        finally:
            restarted.stop()
    finally:
        await channel.close()
        await grpc_server.stop(None)
        redis_server.stop()


# -- from the mesh: ratelimit.failure_mode: local ----------------------------------------------


async def test_mesh_local_mode_reaches_the_service_and_envoy_allows(tmp_path: Path) -> None:
    from envoy.extensions.filters.http.ratelimit.v3 import rate_limit_pb2

    from legation.controlplane import ControlPlane
    from legation.translate._services import RateLimitSide
    from tests.conftest import free_port

    (tmp_path / "limits.yaml").write_text("domain: mesh\ndescriptors: []\n")
    path = tmp_path / "mesh.yaml"
    path.write_text(  # Redis is never reached here: the client connects on first use
        f"xds: {{port: {free_port()}}}\n"
        "services: [{name: web, port: 9080, endpoints: [{port: 9101}]}]\n"
        f"ratelimit: {{port: {free_port()}, config: limits.yaml, backend: redis,\n"
        f"            redis_url: 'redis://127.0.0.1:{free_port()}/0', failure_mode: local,\n"
        "            local_instances: 2}\n"
    )
    cp = ControlPlane(path, status_port=0, ca_dir=tmp_path / "ca", on_event=lambda _: None)
    await cp.start()
    try:
        assert cp.mesh is not None and cp.mesh.ratelimit is not None
        envoy_side = rate_limit_pb2.RateLimit()
        RateLimitSide.http_filters(cp.mesh.ratelimit, "c")[0].typed_config.Unpack(envoy_side)
        assert envoy_side.failure_mode_deny is False  # the service answers; Envoy allows
        server = cp.services.running["ratelimit"].server  # type: ignore[attr-defined]
        limiter = server.legation_limiter
        assert isinstance(limiter.backend, LocalFallback) and limiter.backend.instances == 2
        store = limiter.backend.store
        path.write_text(
            path.read_text().replace(
                "failure_mode: local,\n            local_instances: 2", "failure_mode: closed"
            )
        )
        assert await cp.reload() is True
        assert cp.services.running["ratelimit"].server is server  # type: ignore[attr-defined]
        assert limiter.backend is store and server.legation_servicer.failure_mode == "deny"
    finally:
        await cp.stop()
