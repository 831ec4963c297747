"""Fixtures for the rate-limit tests: a settable clock, request builders, real redis-servers."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.ratelimit.v3 import rls_pb2
from prometheus_client import CollectorRegistry

from legation.ratelimit.backends.memory import MemoryBackend
from legation.ratelimit.config import RateLimitConfig, parse
from legation.ratelimit.limiter import RateLimiter
from legation.ratelimit.metrics import RateLimitMetrics
from tests.conftest import free_port

FIXTURES = Path(__file__).parent / "fixtures"
REDIS_SERVER = shutil.which("redis-server")
needs_redis = pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server not installed")


class FakeClock:
    """Seconds since the epoch, moved by hand."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def descriptor(
    *entries: tuple[str, str], hits_addend: int | None = None
) -> ratelimit_pb2.RateLimitDescriptor:
    d = ratelimit_pb2.RateLimitDescriptor(
        entries=[ratelimit_pb2.RateLimitDescriptor.Entry(key=k, value=v) for k, v in entries]
    )
    if hits_addend is not None:
        d.hits_addend.value = hits_addend
    return d


def request(
    domain: str, *descriptors: ratelimit_pb2.RateLimitDescriptor, hits_addend: int = 0
) -> rls_pb2.RateLimitRequest:
    return rls_pb2.RateLimitRequest(domain=domain, descriptors=descriptors, hits_addend=hits_addend)


def make_limiter(
    config: RateLimitConfig | str,
    *,
    clock: FakeClock | None = None,
    backend: object | None = None,
    **kwargs: object,
) -> RateLimiter:
    if isinstance(config, str):
        parsed = parse(config, source="test.yaml")
        config = RateLimitConfig({parsed.domain: parsed})
    return RateLimiter(
        config=config,
        backend=backend or MemoryBackend(),  # type: ignore[arg-type]
        metrics=RateLimitMetrics(CollectorRegistry()),
        clock=clock or FakeClock(),
        **kwargs,
    )  # type: ignore[arg-type]


def sample(limiter: RateLimiter, name: str, **labels: str) -> float:
    value = limiter.metrics.registry.get_sample_value(f"legation_ratelimit_{name}", labels)
    return value or 0.0


class RedisServer:
    """A real redis-server on a free loopback port, in its own temp dir."""

    def __init__(self, tmp: Path, *extra: str) -> None:
        self.port = free_port()
        self.dir = tmp
        self.proc = subprocess.Popen(
            [
                REDIS_SERVER or "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(tmp),
                *extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                redis.Redis(port=self.port, socket_timeout=0.5).ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.stop()
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.02)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    if REDIS_SERVER is None:
        pytest.skip("redis-server not installed")
    server = RedisServer(tmp_path)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def shared_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server for a whole module (tests use distinct key prefixes)."""
    if REDIS_SERVER is None:
        pytest.skip("redis-server not installed")
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def demo_factory_module() -> Iterator[object]:
    """Like the shared ``demo_factory``, for module-scoped stacks."""
    from legation.demo import DemoApp

    started: list[DemoApp] = []

    def make(name: str, **kwargs: object) -> DemoApp:
        app = DemoApp(name=name, **kwargs).start_in_thread()  # type: ignore[arg-type]
        started.append(app)
        return app

    yield make
    for app in started:
        app.stop_thread()
