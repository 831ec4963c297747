"""The fused call-out in-process: descriptors as Envoy builds them, the rate-limit headers as
Envoy writes them, failure modes, and what an attacker can put in a call (names, values)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any

import httptools
import pytest
from envoy.service.ratelimit.v3 import rls_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from legation import plugins
from legation.extauthz import service as authz
from legation.extauthz.checks import Decision, PythonCheck
from legation.extauthz.request import RequestContext
from legation.extproc.filters.header_route import HeaderRouteFactory
from legation.fastpath._http import Call
from legation.fastpath.descriptors import (
    GenericEntry,
    HeaderEntry,
    RemoteEntry,
    rate_limit_request,
    x_ratelimit_headers,
)
from legation.fastpath.fused import FusedDecider, FusedRoute, FusedRoutes
from legation.fastpath.server import CalloutApp
from legation.ratelimit import service as rl
from legation.ratelimit.config import load_texts
from legation.ratelimit.errors import RateLimitError

pytestmark = pytest.mark.either_loop  # on asyncio's loop and on uvloop, as served

LIMITS = """domain: mesh
descriptors:
  - key: generic_key
    value: api
    descriptors:
      - key: user
        rate_limit: {unit: minute, requests_per_unit: 2}
"""
API = ((GenericEntry("generic_key", "api"), HeaderEntry("x-user", "user")),)


def _entries(request: rls_pb2.RateLimitRequest | None) -> list[list[tuple[str, str]]]:
    assert request is not None
    return [[(e.key, e.value) for e in d.entries] for d in request.descriptors]


def test_descriptors_follow_envoys_route_actions() -> None:
    specs = (
        (GenericEntry("generic_key", "a"), HeaderEntry("x-user", "user")),
        (HeaderEntry("x-tenant", "tenant", skip_if_absent=True), GenericEntry("k", "v")),
        (RemoteEntry(), GenericEntry("k", "r")),
    )
    assert _entries(rate_limit_request("d", specs, {"x-user": "bob"}, "10.0.0.1")) == [
        [("generic_key", "a"), ("user", "bob")],
        [("k", "v")],  # the absent header skips only its entry
        [("remote_address", "10.0.0.1"), ("k", "r")],
    ]
    # an absent header without skip_if_absent drops its descriptor; no address drops the third
    assert _entries(rate_limit_request("d", specs, {}, None)) == [[("k", "v")]]
    assert rate_limit_request("d", specs[:1], {}, None) is None  # nothing left: no call


def test_x_ratelimit_headers_as_envoy_writes_them() -> None:
    response = rls_pb2.RateLimitResponse(overall_code=rls_pb2.RateLimitResponse.OK)
    first = response.statuses.add(limit_remaining=7)
    first.current_limit.requests_per_unit = 10
    first.current_limit.unit = rls_pb2.RateLimitResponse.RateLimit.MINUTE
    first.current_limit.name = "per-user"
    first.duration_until_reset.seconds = 12
    second = response.statuses.add(limit_remaining=2)
    second.current_limit.requests_per_unit = 3
    second.current_limit.unit = rls_pb2.RateLimitResponse.RateLimit.SECOND
    second.current_limit.name = 'evil"\r\nx-injected: 1'
    second.duration_until_reset.seconds = 1
    response.statuses.add()  # no limit: not counted
    assert x_ratelimit_headers(response) == [
        ("x-ratelimit-limit", '3, 10;w=60;name="per-user", 3;w=1'),
        ("x-ratelimit-remaining", "2"),
        ("x-ratelimit-reset", "1"),
    ]
    assert x_ratelimit_headers(rls_pb2.RateLimitResponse()) == []


class _DownStore:
    async def hit(self, hits: Sequence[Any], now_ms: int) -> list[Any]:
        raise RateLimitError("store down", code="backend_unavailable")

    async def close(self) -> None:
        return None


def _decider(*, policy: str | None, beta: str) -> FusedDecider:
    """Route ``api``: the ``x-legation-cohort`` header_route (user ``beta`` -> beta) and the
    API limits, counted in memory."""
    limiter = rl.build_limiter(
        rl.Settings(registry=CollectorRegistry()), load_texts([("limits.yaml", LIMITS)])
    )
    factory = HeaderRouteFactory()
    cohort = factory.create(
        factory.validate(
            {
                "header": "x-legation-cohort",
                "rules": [{"header": "x-user", "one_of": [beta], "value": "beta"}],
            }
        )
    )
    routes = {"api": FusedRoute("api", policy, (cohort,), API)}
    return FusedDecider(FusedRoutes(routes), limits=rl.RateLimitServicer(limiter), domain="mesh")


@pytest.fixture
async def app() -> AsyncIterator[CalloutApp]:
    servicer = await authz.build_servicer(
        authz.Settings(config={"checks": {}}, registry=CollectorRegistry())
    )
    yield CalloutApp(servicer, fused=_decider(policy=None, beta="alice"))
    await authz.close_checks(servicer)


async def call(app: CalloutApp, headers: list[tuple[bytes, bytes]]) -> tuple[int, dict[str, str]]:
    out = app(Call(b"GET", b"/legation/check/api", [(b"host", b"gw"), *headers], b"", True))
    raw = out if isinstance(out, bytes) else await out
    got: dict[str, Any] = {"headers": {}}

    class Sink:
        def on_header(self, name: bytes, value: bytes) -> None:
            got["headers"][name.decode().lower()] = value.decode()

    parser = httptools.HttpResponseParser(Sink())
    parser.feed_data(raw)  # a malformed answer raises here
    return parser.get_status_code(), got["headers"]


ROUTE = (b"x-legation-route", b"api")


async def test_a_route_the_server_does_not_know_is_refused(app: CalloutApp) -> None:
    status, _ = await call(app, [(b"x-legation-route", b"admin"), (b"x-user", b"bob")])
    assert status == 403


async def test_routing_then_limits_then_429(app: CalloutApp) -> None:
    status, headers = await call(app, [ROUTE, (b"x-user", b"alice")])
    assert (status, headers["x-legation-cohort"], headers["x-ratelimit-remaining"]) == (
        200,
        "beta",
        "1",
    )
    status, headers = await call(app, [ROUTE, (b"x-user", b"bob")])
    assert headers["x-envoy-auth-headers-to-remove"] == "x-legation-cohort"  # whatever was sent
    await call(app, [ROUTE, (b"x-user", b"bob")])
    status, headers = await call(app, [ROUTE, (b"x-user", b"bob")])
    assert (status, headers["x-envoy-ratelimited"], headers["x-ratelimit-limit"]) == (
        429,
        "true",
        "2, 2;w=60",
    )


async def test_the_call_headers_are_refused_twice(app: CalloutApp) -> None:
    status, _ = await call(app, [ROUTE, ROUTE, (b"x-user", b"bob")])
    assert status == 400


@pytest.mark.parametrize(("mode", "status"), [("allow", 200), ("deny", 503)])
async def test_a_store_that_is_down_follows_the_failure_mode(
    app: CalloutApp, mode: str, status: int
) -> None:
    assert app.fused is not None and app.fused.limits is not None
    app.fused.limits.limiter.backend = _DownStore()  # type: ignore[assignment]
    app.fused.limits.failure_mode = mode
    got, headers = await call(app, [ROUTE, (b"x-user", b"bob")])
    assert got == status and "x-ratelimit-limit" not in headers


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    value=st.text(
        st.characters(min_codepoint=0x20, max_codepoint=0xFF, blacklist_characters="\x7f"),
        min_size=1,
        max_size=20000,
    )
)
def test_any_descriptor_value_is_counted_on_its_own_and_never_echoed(value: str) -> None:
    """Values a client chooses (long, quotes, commas, latin-1, ``x-legation-`` look-alikes): the
    answer is well-formed, carries no part of the value, and the value gets its own counter."""

    async def run() -> None:
        servicer = await authz.build_servicer(
            authz.Settings(config={"checks": {}}, registry=CollectorRegistry())
        )
        limiter = rl.build_limiter(
            rl.Settings(registry=CollectorRegistry()), load_texts([("limits.yaml", LIMITS)])
        )
        routes = {"api": FusedRoute("api", None, (), API)}
        decider = FusedDecider(
            FusedRoutes(routes), limits=rl.RateLimitServicer(limiter), domain="mesh"
        )
        app = CalloutApp(servicer, fused=decider)
        raw = value.strip(" ").encode("latin-1") or b"x"
        for remaining in ("1", "0"):
            status, headers = await call(app, [ROUTE, (b"x-user", raw)])
            assert (status, headers["x-ratelimit-remaining"]) == (200, remaining)
            assert all(raw.decode("latin-1") not in v for v in headers.values() if len(raw) > 3)
        status, _ = await call(app, [ROUTE, (b"x-user", raw + b"2")])
        assert status == 200
        await authz.close_checks(servicer)

    asyncio.run(run())


class _Verified(PythonCheck):
    """Sets ``x-user`` to the identity it verified (as a JWT check's ``claims_to_headers``
    does), whatever the client sent; removes ``x-debug``."""

    name = "verified"

    async def check(self, ctx: RequestContext) -> Decision:
        return Decision(
            allowed=True, headers={"x-user": "alice"}, request_headers_to_remove=("x-debug",)
        )


class _VerifiedFactory:
    name = "verified"

    def validate(self, raw: Any) -> dict[str, Any]:
        return dict(raw)

    def create(self, config: Any) -> _Verified:
        return _Verified()


async def test_routing_and_limits_read_the_headers_authz_set_not_the_clients() -> None:
    """On the gRPC chain ext_proc and the rate limit run after ext_authz and see what it set:
    a client forging ``x-user`` must neither charge another user's counter (nor dodge its
    own by rotating the value) nor buy itself the cohort of the user it names."""
    plugins.register("extauthz.check", _VerifiedFactory())
    servicer = await authz.build_servicer(
        authz.Settings(
            config={"checks": {"verified": {"type": "verified"}}, "default_checks": ["verified"]},
            registry=CollectorRegistry(),
        )
    )
    try:
        decider = _decider(policy="p", beta="mallory")
        app = CalloutApp(servicer, upstream_headers=["x-user"], fused=decider)
        statuses = []
        for forged in ("mallory", "bob", "carol"):
            status, headers = await call(app, [ROUTE, (b"x-user", forged.encode())])
            statuses.append(status)
            assert headers.get("x-legation-cohort") is None  # alice is not in the cohort
            assert status == 429 or headers["x-user"] == "alice"  # the verified value goes up
        assert statuses == [200, 200, 429]  # all three counted as alice (2 a minute)
    finally:
        await authz.close_checks(servicer)
        plugins.unregister("extauthz.check", "verified")
