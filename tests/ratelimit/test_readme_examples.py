"""The envoyproxy/ratelimit README examples, as fixtures, behave as the README documents."""

from __future__ import annotations

from legation.ratelimit.config import load_files
from legation.ratelimit.limiter import MAX_UINT32, OK, OVER_LIMIT
from tests.ratelimit.conftest import FIXTURES, FakeClock, descriptor, make_limiter, request, sample

README = FIXTURES / "readme"


def limiter_for(*names: str, clock: FakeClock | None = None):  # type: ignore[no-untyped-def]
    return make_limiter(load_files(README / f"{n}.yaml" for n in names), clock=clock)


async def hammer(limiter, req, n: int) -> list[int]:  # type: ignore[no-untyped-def]
    return [(await limiter.should_rate_limit(req)).overall_code for _ in range(n)]


async def test_example1_two_values_each_500_per_second() -> None:
    lim = limiter_for("example1")
    users = request("mongo_cps", descriptor(("database", "users")))
    codes = await hammer(lim, users, 501)
    assert codes[:500] == [OK] * 500 and codes[500] == OVER_LIMIT
    default = await lim.should_rate_limit(request("mongo_cps", descriptor(("database", "default"))))
    assert default.overall_code == OK and default.statuses[0].limit_remaining == 499
    other = await lim.should_rate_limit(request("mongo_cps", descriptor(("database", "x"))))
    assert other.overall_code == OK and not other.statuses[0].HasField("current_limit")


async def test_example2_nested_and_per_number_limits() -> None:
    lim = limiter_for("example2")
    marketing = descriptor(("message_type", "marketing"), ("to_number", "2061111111"))
    number = descriptor(("to_number", "2061111111"))
    codes = await hammer(lim, request("messaging", marketing, number), 6)
    assert codes == [OK] * 5 + [OVER_LIMIT]
    resp = await lim.should_rate_limit(request("messaging", marketing, number))
    assert [s.code for s in resp.statuses] == [OVER_LIMIT, OK]
    assert resp.statuses[0].current_limit.requests_per_unit == 5
    assert resp.statuses[1].limit_remaining == 100 - 7  # every request counted on the number
    # another number has its own 5 marketing messages
    other = descriptor(("message_type", "marketing"), ("to_number", "2062222222"))
    assert (await lim.should_rate_limit(request("messaging", other))).overall_code == OK


async def test_example3_most_specific_match_wins() -> None:
    lim = limiter_for("example3")
    banned = await lim.should_rate_limit(
        request("edge_proxy_per_ip", descriptor(("remote_address", "50.0.0.5")))
    )
    assert banned.overall_code == OVER_LIMIT
    codes = await hammer(
        lim, request("edge_proxy_per_ip", descriptor(("remote_address", "50.0.0.1"))), 11
    )
    assert codes == [OK] * 10 + [OVER_LIMIT]
    fresh = await lim.should_rate_limit(
        request("edge_proxy_per_ip", descriptor(("remote_address", "50.0.0.2")))
    )
    assert fresh.overall_code == OK and fresh.statuses[0].limit_remaining == 9


async def test_example4_levels_must_match_the_request_length() -> None:
    two = request("example4", descriptor(("key", "value"), ("subkey", "subvalue")))
    flat = await limiter_for("example4a").should_rate_limit(two)
    assert not flat.statuses[0].HasField("current_limit")
    nested = await limiter_for("example4b").should_rate_limit(two)
    assert nested.statuses[0].current_limit.requests_per_unit == 300
    assert nested.statuses[0].limit_remaining == 299


async def test_example5_unlimited_answers_max_uint32_without_counting() -> None:
    lim = limiter_for("example5")
    codes = await hammer(lim, request("internal", descriptor(("ldap", "x"))), 200)
    assert codes == [OK] * 200
    resp = await lim.should_rate_limit(request("internal", descriptor(("ldap", "x"))))
    assert resp.statuses[0].limit_remaining == MAX_UINT32
    assert len(lim.backend) == 0  # type: ignore[arg-type]
    codes = await hammer(lim, request("internal", descriptor(("azure", "x"))), 101)
    assert codes[-2:] == [OK, OVER_LIMIT]


async def test_example6_shadow_mode_lets_through_and_counts() -> None:
    lim = limiter_for("example6")
    a = request("example6", descriptor(("service", "auth-service"), ("user", "user-a")))
    assert await hammer(lim, a, 15) == [OK] * 15
    key = "example6.service.user_user-a"
    assert sample(lim, "shadow_mode_total", domain="example6", descriptor=key) == 5
    assert sample(lim, "over_limit_total", domain="example6", descriptor=key) == 5
    b = request("example6", descriptor(("service", "auth-service"), ("user", "user-b")))
    assert (await hammer(lim, b, 21))[-2:] == [OK, OVER_LIMIT]


async def test_example7_replaces() -> None:
    lim = limiter_for("example7")
    first = descriptor(("key_1", "value_1"), ("user", "bkthomps"))
    second = descriptor(("key_2", "value_2"), ("user", "bkthomps"))
    # together: the 10/s rule replaces the 5/s one, which is neither checked nor counted
    both = await hammer(lim, request("example7", first, second), 10)
    assert both == [OK] * 10
    resp = await lim.should_rate_limit(request("example7", first, second))
    assert resp.overall_code == OVER_LIMIT
    assert not resp.statuses[0].HasField("current_limit")
    assert resp.statuses[1].current_limit.requests_per_unit == 10
    # alone, the 5/s rule is untouched by the 11 requests above
    alone = await hammer(lim, request("example7", first), 6)
    assert alone == [OK] * 5 + [OVER_LIMIT]


async def test_example8_detailed_metric_keeps_the_value() -> None:
    lim = limiter_for("example8")
    for value in ("unspecified_value", "unspecified_value2", "value1"):
        await lim.should_rate_limit(request("example8", descriptor(("key1", value))))
    for key in ("key1_unspecified_value", "key1_unspecified_value2", "key1_value1"):
        assert sample(lim, "total_hits_total", domain="example8", descriptor=f"example8.{key}") == 1
    assert sample(lim, "total_hits_total", domain="example8", descriptor="example8.key1") == 0
    resp = await lim.should_rate_limit(request("example8", descriptor(("key1", "value1"))))
    assert resp.statuses[0].current_limit.requests_per_unit == 20


async def test_example9_wildcard_prefix() -> None:
    clock = FakeClock()
    lim = limiter_for("example9", clock=clock)
    for value in ("value_1", "value_2"):
        codes = await hammer(lim, request("example9", descriptor(("key1", value))), 21)
        assert codes == [OK] * 20 + [OVER_LIMIT]  # each value counted on its own
    miss = await lim.should_rate_limit(request("example9", descriptor(("key1", "other"))))
    assert not miss.statuses[0].HasField("current_limit")
    clock.advance(60)
    resp = await lim.should_rate_limit(request("example9", descriptor(("key1", "value_1"))))
    assert resp.overall_code == OK and resp.statuses[0].limit_remaining == 19
