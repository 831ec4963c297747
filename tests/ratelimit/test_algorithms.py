"""Exact counting at window edges, for each algorithm, on each backend, with a settable clock."""

from __future__ import annotations

import random
import uuid
from collections.abc import AsyncIterator

import pytest

from legation.ratelimit.algorithms import Hit
from legation.ratelimit.backends import Backend
from legation.ratelimit.backends.memory import MemoryBackend
from legation.ratelimit.backends.redis import RedisBackend, RedisConfig
from legation.ratelimit.config import Algorithm, Limit
from tests.ratelimit.conftest import RedisServer

T0 = 1_699_999_200_000  # ms, aligned to the hour (so to the second and the minute)


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    if request.param == "memory":
        b: Backend = MemoryBackend()
    else:
        server: RedisServer = request.getfixturevalue("shared_redis")
        b = RedisBackend(
            RedisConfig(
                url=server.url,
                key_prefix=f"t{uuid.uuid4().hex}:",
                timeout_ms=2000,
                local_cache_size=0,
            )
        )
    yield b
    await b.close()


def lim(rpu: int, algorithm: Algorithm, unit: str = "second") -> Limit:
    return Limit(unit=unit, requests_per_unit=rpu, algorithm=algorithm)


async def run(
    backend: Backend, limit: Limit, at_ms: int, n: int = 1, cost: int = 1
) -> list[tuple[bool, int, int]]:
    out = []
    for _ in range(n):
        (d,) = await backend.hit([Hit("k", limit, cost)], at_ms)
        out.append((d.allowed, d.remaining, d.reset_ms))
    return out


async def test_fixed_window_edges(backend: Backend) -> None:
    limit = lim(3, Algorithm.FIXED_WINDOW)
    got = await run(backend, limit, T0 + 999, 4)
    assert got == [(True, 2, 1), (True, 1, 1), (True, 0, 1), (False, 0, 1)]
    assert await run(backend, limit, T0 + 1000) == [(True, 2, 1000)]  # a new window
    assert await run(backend, limit, T0 + 1999, 2) == [(True, 1, 1), (True, 0, 1)]
    assert await run(backend, limit, T0 + 2000) == [(True, 2, 1000)]


async def test_fixed_window_cost(backend: Backend) -> None:
    limit = lim(10, Algorithm.FIXED_WINDOW, "minute")
    got = await run(backend, limit, T0, 3, cost=5)
    assert got == [(True, 5, 60_000), (True, 0, 60_000), (False, 0, 60_000)]


async def test_sliding_window_edges(backend: Backend) -> None:
    limit = lim(10, Algorithm.SLIDING_WINDOW)
    got = await run(backend, limit, T0 + 500, 11)
    assert [a for a, _, _ in got] == [True] * 10 + [False]
    assert got[-1] == (False, 0, 500)
    # next window: the previous 10 weigh 100%, then 90%, then 50%
    assert await run(backend, limit, T0 + 1000) == [(False, 0, 1000)]
    assert [a for a, _, _ in await run(backend, limit, T0 + 1099)] == [False]
    assert [a for a, _, _ in await run(backend, limit, T0 + 1100, 2)] == [True, False]
    got = await run(backend, limit, T0 + 1500, 5)
    assert [a for a, _, _ in got] == [True] * 4 + [False]  # 5 (weighted) + 1 + 4 = 10
    # the window after: the 5 admitted in window 1 weigh 100% at its start
    got = await run(backend, limit, T0 + 2000, 6)
    assert [a for a, _, _ in got] == [True] * 5 + [False]
    assert got[0] == (True, 4, 1000)
    # two idle windows later nothing weighs any more
    got = await run(backend, limit, T0 + 4000, 11)
    assert [a for a, _, _ in got] == [True] * 10 + [False]


async def test_token_bucket_refill(backend: Backend) -> None:
    limit = lim(10, Algorithm.TOKEN_BUCKET)
    got = await run(backend, limit, T0, 11)
    assert got[0] == (True, 9, 100)
    assert got[9] == (True, 0, 1000)
    assert got[10] == (False, 0, 1000)
    assert [a for a, _, _ in await run(backend, limit, T0 + 99)] == [False]
    assert await run(backend, limit, T0 + 100, 2) == [(True, 0, 1000), (False, 0, 1000)]
    got = await run(backend, limit, T0 + 350, 3)  # 2.5 tokens
    assert [a for a, _, _ in got] == [True, True, False]
    assert got[2] == (False, 0, 950)
    assert [a for a, _, _ in await run(backend, limit, T0 + 400)] == [True]
    # idle for long: full again, never more than the capacity
    got = await run(backend, limit, T0 + 60_000, 11)
    assert [a for a, _, _ in got] == [True] * 10 + [False]


async def test_token_bucket_cost_is_all_or_nothing(backend: Backend) -> None:
    limit = lim(10, Algorithm.TOKEN_BUCKET, "minute")  # one token per 6 s
    assert (await run(backend, limit, T0, 1, cost=7))[0][:2] == (True, 3)
    assert (await run(backend, limit, T0, 1, cost=4))[0][:2] == (False, 3)  # nothing taken
    assert (await run(backend, limit, T0, 1, cost=3))[0][:2] == (True, 0)
    assert (await run(backend, limit, T0 + 12_000, 1, cost=2))[0][:2] == (True, 0)


async def test_zero_limit_refuses_everything(backend: Backend) -> None:
    for algorithm in Algorithm:
        got = await backend.hit([Hit(f"z{algorithm}", lim(0, algorithm), 1)], T0)
        assert not got[0].allowed


@pytest.mark.redis
async def test_redis_and_memory_agree_on_a_random_schedule(shared_redis: RedisServer) -> None:
    rng = random.Random(6)
    memory = MemoryBackend()
    redis_backend = RedisBackend(
        RedisConfig(
            url=shared_redis.url,
            timeout_ms=2000,
            key_prefix=f"agree{uuid.uuid4().hex}:",
            local_cache_size=0,
        )
    )
    limits = [
        lim(rng.randint(1, 8), a, rng.choice(["second", "minute"]))
        for a in Algorithm
        for _ in range(2)
    ]
    now = T0
    try:
        for _ in range(300):
            now += rng.choice([0, 1, 7, 50, 333, 999, 1000, 4000])
            hits = [
                Hit(f"k{i}", limit, rng.randint(1, 3))
                for i, limit in enumerate(limits)
                if rng.random() < 0.6
            ]
            assert await memory.hit(hits, now) == await redis_backend.hit(hits, now)
    finally:
        await redis_backend.close()
