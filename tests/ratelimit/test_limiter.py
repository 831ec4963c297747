"""The limiter's semantics beyond the README: several limits, cost, overrides, global shadow."""

from __future__ import annotations

import pytest
from envoy.type.v3 import ratelimit_unit_pb2

from legation.ratelimit import limiter as limiter_module
from legation.ratelimit.errors import RateLimitError
from legation.ratelimit.limiter import OK, OVER_LIMIT
from tests.ratelimit.conftest import FakeClock, descriptor, make_limiter, request, sample

SEVERAL = """
domain: api
descriptors:
  - key: user
    rate_limits:
      - {unit: second, requests_per_unit: 3}
      - {unit: minute, requests_per_unit: 5, algorithm: sliding_window}
"""


async def test_several_limits_all_must_pass() -> None:
    clock = FakeClock(1_699_999_200.0)
    lim = make_limiter(SEVERAL, clock=clock)
    req = request("api", descriptor(("user", "ann")))
    codes = [(await lim.should_rate_limit(req)).overall_code for _ in range(4)]
    assert codes == [OK, OK, OK, OVER_LIMIT]  # the per-second limit
    clock.advance(1)
    resp = await lim.should_rate_limit(req)
    # the minute limit (5) now has the least room: it admitted all 4 earlier hits (each limit
    # counts on its own) and this one
    assert resp.overall_code == OK
    assert resp.statuses[0].current_limit.unit == resp.statuses[0].current_limit.MINUTE
    assert resp.statuses[0].limit_remaining == 0
    resp = await lim.should_rate_limit(req)
    assert resp.overall_code == OVER_LIMIT  # per second fine (2 of 3), per minute spent
    assert resp.statuses[0].current_limit.requests_per_unit == 5


async def test_hits_addend_request_and_descriptor() -> None:
    lim = make_limiter(
        "domain: d\ndescriptors:\n  - key: k\n    rate_limit: {unit: hour, requests_per_unit: 10}\n"
    )
    resp = await lim.should_rate_limit(request("d", descriptor(("k", "a")), hits_addend=4))
    assert resp.statuses[0].limit_remaining == 6
    resp = await lim.should_rate_limit(
        request("d", descriptor(("k", "a"), hits_addend=5), hits_addend=4)
    )
    assert resp.statuses[0].limit_remaining == 1
    resp = await lim.should_rate_limit(request("d", descriptor(("k", "a"), hits_addend=2)))
    assert resp.overall_code == OVER_LIMIT
    assert sample(lim, "total_hits_total", domain="d", descriptor="d.k") == 11
    # split as upstream splits a hits_addend: 9 -> 11 puts 1 hit over 10 and 1 between 8 and 10;
    # 4 -> 9 put 1 past the near threshold (8)
    assert sample(lim, "over_limit_total", domain="d", descriptor="d.k") == 1
    assert sample(lim, "near_limit_total", domain="d", descriptor="d.k") == 2


async def test_global_shadow_mode_answers_ok_and_counts() -> None:
    lim = make_limiter(
        "domain: d\ndescriptors:\n  - key: k\n    rate_limit: {unit: hour, requests_per_unit: 1}\n",
        shadow_mode=True,
    )
    req = request("d", descriptor(("k", "a")))
    responses = [await lim.should_rate_limit(req) for _ in range(3)]
    assert [r.overall_code for r in responses] == [OK] * 3
    # as upstream: the statuses still say OVER_LIMIT, only the overall answer is OK
    assert [r.statuses[0].code for r in responses] == [OK, OVER_LIMIT, OVER_LIMIT]
    assert sample(lim, "global_shadow_mode_total") == 2
    assert sample(lim, "over_limit_total", domain="d", descriptor="d.k") == 2


async def test_descriptor_limit_override_is_counted_on_its_own() -> None:
    lim = make_limiter(
        "domain: d\ndescriptors:\n  - key: k\n"
        "    rate_limit: {unit: hour, requests_per_unit: 100}\n"
    )
    d = descriptor(("k", "a"))
    d.limit.requests_per_unit = 1
    d.limit.unit = ratelimit_unit_pb2.SECOND
    codes = [(await lim.should_rate_limit(request("d", d))).overall_code for _ in range(2)]
    assert codes == [OK, OVER_LIMIT]
    plain = await lim.should_rate_limit(request("d", descriptor(("k", "a"))))
    assert plain.statuses[0].limit_remaining == 99


async def test_unknown_domain_is_ok_without_limit() -> None:
    lim = make_limiter("domain: d\n")
    resp = await lim.should_rate_limit(request("other", descriptor(("k", "a"))))
    assert resp.overall_code == OK and not resp.statuses[0].HasField("current_limit")


@pytest.mark.parametrize(
    "req, message",
    [
        (request("", descriptor(("k", "a"))), "domain must not be empty"),
        (request("d"), "descriptor list must not be empty"),
        # what would hold the service's loop: refused before any matching
        (
            request("d", *(descriptor(("k", str(i))) for i in range(257))),
            "257 descriptors in one request, more than 256",
        ),
        (
            request("d", descriptor(("k", "a")), descriptor(*((f"k{i}", "v") for i in range(65)))),
            r"descriptors\[1\]: 65 entries, more than 64",
        ),
    ],
)
async def test_malformed_requests_raise_invalid_request(req, message) -> None:  # type: ignore[no-untyped-def]
    lim = make_limiter("domain: d\n")
    with pytest.raises(RateLimitError, match=message) as info:
        await lim.should_rate_limit(req)
    assert info.value.code == "invalid_request"


async def test_swap_applies_to_the_next_request() -> None:
    lim = make_limiter(
        "domain: d\ndescriptors:\n  - key: k\n    rate_limit: {unit: hour, requests_per_unit: 1}\n"
    )
    other = make_limiter(
        "domain: d\ndescriptors:\n  - key: k\n    rate_limit: {unit: hour, requests_per_unit: 50}\n"
    )
    req = request("d", descriptor(("k", "a")))
    await lim.should_rate_limit(req)
    lim.swap(other.config)
    resp = await lim.should_rate_limit(req)
    assert resp.overall_code == OK and resp.statuses[0].limit_remaining == 48  # same counter


async def test_metric_keys_callers_choose_stop_growing_at_the_bound(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A limit override's metric key holds the descriptor's values, which come from requests:
    past MAX_METRIC_KEYS distinct keys, hits are counted under one overflow key, so that the
    exposition stays bounded (and no hit goes uncounted)."""
    monkeypatch.setattr(limiter_module, "MAX_METRIC_KEYS", 3)
    lim = make_limiter("domain: d\ndescriptors:\n  - key: k\n")
    for i in range(10):
        d = descriptor(("k", f"caller-chose-{i}"))
        d.limit.requests_per_unit, d.limit.unit = 100, ratelimit_unit_pb2.SECOND
        await lim.should_rate_limit(request("d", d))
    keys = {
        s.labels["descriptor"]: s.value
        for metric in lim.metrics.registry.collect()
        for s in metric.samples
        if s.name == "legation_ratelimit_total_hits_total"
    }
    assert len(keys) == 4 and keys[limiter_module.OVERFLOW_METRIC_KEY] == 7
    assert sum(keys.values()) == 10
