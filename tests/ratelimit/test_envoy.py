"""Through the real Envoy: 429 after N requests, the rate-limit headers reach the client, shadow
mode lets requests through and counts them, failure_mode_deny matches the service's setting."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from legation.envoy_process import EnvoyProcess
from legation.ratelimit import envoy_filter as ef
from legation.ratelimit.service import Settings
from tests.conftest import free_port
from tests.ratelimit.harness import ServiceThread, bootstrap, get

pytestmark = pytest.mark.integration

LIMITS = """
domain: edge
descriptors:
  - key: generic_key
    value: limited
    descriptors:
      - key: user
        rate_limit: {unit: hour, requests_per_unit: 3}
  - key: generic_key
    value: shadowed
    descriptors:
      - key: user
        shadow_mode: true
        rate_limit: {unit: hour, requests_per_unit: 2}
"""
ROUTES = [
    ("/limited", [ef.GenericKey("limited"), ef.RequestHeader("x-user", "user")]),
    ("/shadow", [ef.GenericKey("shadowed"), ef.RequestHeader("x-user", "user")]),
]
_users = itertools.count()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, demo_factory_module) -> Iterator[tuple]:  # type: ignore[no-untyped-def]
    config = tmp_path_factory.mktemp("rl") / "limits.yaml"
    config.write_text(LIMITS)
    service = ServiceThread(
        Settings(config_files=(str(config),), reload_interval=0, registry=CollectorRegistry())
    ).start()
    upstream = demo_factory_module("upstream")
    listen, admin = free_port(), free_port()
    envoy = EnvoyProcess(
        bootstrap(
            listen_port=listen,
            admin_port=admin,
            upstream_port=upstream.port,
            routes=ROUTES,
            rls_port=service.port,
        ),
        admin_port=admin,
        name="rl-envoy",
    )
    envoy.start()
    try:
        envoy.wait_live()
        yield envoy, listen, service
    finally:
        envoy.stop()
        service.stop()


def test_429_after_n_requests_with_headers(stack) -> None:  # type: ignore[no-untyped-def]
    envoy, listen, _ = stack
    user = {"x-user": f"u{next(_users)}"}
    answers = [get(listen, "/limited/x", user) for _ in range(4)]
    assert [status for status, _ in answers] == [200, 200, 200, 429]
    assert [h.get("x-ratelimit-remaining") for _, h in answers] == ["2", "1", "0", "0"]
    for _, headers in answers:
        assert headers["x-ratelimit-limit"].startswith("3")
        assert 0 < int(headers["x-ratelimit-reset"]) <= 3600
    assert answers[3][1].get("x-envoy-ratelimited") == "true"
    # another user has their own counter
    assert get(listen, "/limited/x", {"x-user": f"u{next(_users)}"})[0] == 200
    assert envoy.stats("ratelimit")["cluster.upstream.ratelimit.over_limit"] >= 1


def test_shadow_mode_lets_through_and_counts(stack) -> None:  # type: ignore[no-untyped-def]
    _, listen, service = stack
    user = f"s{next(_users)}"
    statuses = [get(listen, "/shadow", {"x-user": user})[0] for _ in range(5)]
    assert statuses == [200] * 5
    metrics = service.call(lambda: service.server.legation_limiter.metrics)
    shadowed = metrics.registry.get_sample_value(
        "legation_ratelimit_shadow_mode_total",
        {"domain": "edge", "descriptor": "edge.generic_key_shadowed.user"},
    )
    assert shadowed is not None and shadowed >= 3


def test_unmatched_route_is_not_limited(stack) -> None:  # type: ignore[no-untyped-def]
    _, listen, _ = stack
    assert [get(listen, "/free")[0] for _ in range(5)] == [200] * 5


@pytest.mark.parametrize("failure_mode, expected", [("allow", 200), ("deny", 500)])
def test_envoy_failure_mode_matches_the_service(
    demo_factory,
    failure_mode: str,
    expected: int,
    tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    upstream = demo_factory("upstream")
    listen, admin = free_port(), free_port()
    dead = free_port()  # nothing listens: the service is unreachable
    envoy = EnvoyProcess(
        bootstrap(
            listen_port=listen,
            admin_port=admin,
            upstream_port=upstream.port,
            routes=ROUTES[:1],
            rls_port=dead,
            failure_mode=failure_mode,
        ),
        admin_port=admin,
        name=f"rl-{failure_mode}",
        log_dir=tmp_path,
    )
    with envoy:
        envoy.wait_live()
        assert get(listen, "/limited", {"x-user": "a"})[0] == expected
