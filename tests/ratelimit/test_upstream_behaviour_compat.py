"""envoyproxy/ratelimit's service and limiter cases, run against Legation's RateLimiter.

Upstream tests a mocked config and cache; here the same situations are produced for real (a small
config, the memory backend, a fake clock, a counter filled first with ``hits_addend``), and the
answer is compared field by field: overall code, each status's code, current limit, remaining,
the ``RateLimit-*`` response headers, dynamic metadata, and the per-descriptor counters. Each case
names the upstream test it mirrors:

* ``src/service/ratelimit_test.go`` (service: shadow and quota modes, headers, metadata, unlimited);
* ``test/redis/fixed_cache_impl_test.go`` (``TestRedis``, ``TestNearLimit``,
  ``TestOverLimitWithLocalCache*``: remaining, near/over split of a ``hits_addend``);
* ``test/limiter/base_limiter_test.go`` (cache keys: per value, or shared with share_threshold);
* ``test/config/config_test.go`` ``TestConfigLimitOverride`` (overrides, known domains only).

Rows marked ``DIFFERS`` are deliberate differences, listed in README.md.
"""

from __future__ import annotations

from typing import Any

import pytest
from envoy.type.v3 import ratelimit_unit_pb2
from google.protobuf.json_format import MessageToDict

from legation.ratelimit.config import load_texts
from legation.ratelimit.errors import RateLimitError
from legation.ratelimit.limiter import (
    OK,
    RateLimiter,
    ResponseHeaders,
)
from tests.ratelimit.conftest import FakeClock, descriptor, make_limiter, request, sample

MAX_UINT32 = 2**32 - 1
NOW = 2222.0  # upstream's MockClock: a minute window has 58 s left

# One config for the service cases: foo/hello/baz stand for upstream's mocked limits.
SERVICE = """
domain: d
descriptors:
  - {key: foo, rate_limit: {unit: minute, requests_per_unit: 10, name: key_name}}
  - {key: shadow1, shadow_mode: true, rate_limit: {unit: minute, requests_per_unit: 10}}
  - {key: shadow2, shadow_mode: true, rate_limit: {unit: minute, requests_per_unit: 10}}
  - {key: baz, rate_limit: {unlimited: true}}
  - {key: regular, rate_limit: {unit: minute, requests_per_unit: 5},
     metadata: {name: service_1}}
  - {key: quota, quota_mode: true, rate_limit: {unit: minute, requests_per_unit: 3},
     metadata: {name: service_2}}
  - {key: quota1, quota_mode: true, rate_limit: {unit: minute, requests_per_unit: 5},
     metadata: {name: service_1}}
  - {key: quota2, quota_mode: true, rate_limit: {unit: minute, requests_per_unit: 3},
     metadata: {some_other_name: service_2, nested: {a: 1}}}
  - {key: quota3, quota_mode: true, rate_limit: {unit: minute, requests_per_unit: 3},
     metadata: {name: service_3, nested: {a: 2, b: 3}}}
  - {key: ten_sec, rate_limit: {unit: second, requests_per_unit: 10}}
  - {key: zero, rate_limit: {unit: second}}
  - {key: named, rate_limit: {unit: minute, requests_per_unit: 1, name: a}}
  - {key: replacer, rate_limit: {unit: minute, requests_per_unit: 100, replaces: [{name: a}]}}
  - {key: midWild, value: bar*b, rate_limit: {unit: minute, requests_per_unit: 1}}
  - {key: files, value: files/*, share_threshold: true,
     rate_limit: {unit: minute, requests_per_unit: 2}}
  - {key: pics, value: pics/*, rate_limit: {unit: minute, requests_per_unit: 2}}
  - {key: key7, detailed_metric: true, rate_limit: {unit: minute, requests_per_unit: 70}}
  - key: key2
    value: value2
    descriptors:
      - {key: subkey2, value: subvalue2, rate_limit: {unit: minute, requests_per_unit: 10}}
  - key: key3
    value: value3
    rate_limit: {unit: hour, requests_per_unit: 10}
    descriptors:
      - {key: subkey3, value: subvalue3, rate_limit: {unit: day, requests_per_unit: 10}}
  - {key: sh, shadow_mode: true, rate_limit: {unit: minute, requests_per_unit: 1}}
"""


def limiter(text: str = SERVICE, *, now: float = NOW, **kwargs: Any) -> RateLimiter:
    return make_limiter(text, clock=FakeClock(now), **kwargs)


async def fill(lim: RateLimiter, key: str, count: int, value: str = "x") -> None:
    """Bring ``key=value``'s counter to ``count`` (the mocked INCRBY result upstream)."""
    if count:
        await lim.should_rate_limit(request("d", descriptor((key, value), hits_addend=count)))


def statuses(resp: Any) -> list[tuple[str, int | None, int]]:
    """(code, requests_per_unit or None, remaining) per status."""
    out = []
    for s in resp.statuses:
        limit = s.current_limit.requests_per_unit if s.HasField("current_limit") else None
        out.append(("OK" if s.code == OK else "OVER", limit, s.limit_remaining))
    return out


def overall(resp: Any) -> str:
    return "OK" if resp.overall_code == OK else "OVER"


# -- src/service/ratelimit_test.go -----------------------------------------------------------------

# (upstream test, settings, counters to fill first, request keys, overall, statuses,
#  global_shadow_mode counter)
SERVICE_CASES = [
    ("TestService/no-limit", {}, {}, ["hello"], "OK", [("OK", None, 0)], 0),
    (
        "TestService/over+none",
        {},
        {"foo": 10},
        ["foo", "hello"],
        "OVER",
        [("OVER", 10, 0), ("OK", None, 0)],
        0,
    ),
    (
        "TestService/order",
        {},
        {"foo": 10},
        ["hello", "foo"],
        "OVER",
        [("OK", None, 0), ("OVER", 10, 0)],
        0,
    ),
    (
        "TestServiceGlobalShadowMode",
        {"shadow_mode": True},
        {"foo": 10},
        ["foo", "hello"],
        "OK",
        [("OVER", 10, 0), ("OK", None, 0)],
        1,
    ),
    (
        "TestRuleShadowMode",
        {},
        {"shadow1": 10, "shadow2": 10},
        ["shadow1", "shadow2"],
        "OK",
        [("OK", 10, 0), ("OK", 10, 0)],
        0,
    ),
    (
        "TestMixedRuleShadowMode",
        {},
        {"shadow1": 10, "foo": 10},
        ["shadow1", "foo"],
        "OVER",
        [("OK", 10, 0), ("OVER", 10, 0)],
        0,
    ),
    (
        "TestUnlimited",
        {},
        {},
        ["foo", "hello", "baz"],
        "OK",
        [("OK", 10, 9), ("OK", None, 0), ("OK", None, MAX_UINT32)],
        0,
    ),
    (
        "TestServiceGlobalQuotaMode",
        {"quota_mode": True},
        {"foo": 10, "regular": 5},
        ["foo", "regular"],
        "OVER",
        [("OVER", 10, 0), ("OVER", 5, 0)],
        0,
    ),
    (
        "TestServiceGlobalQuotaMode/one-over",
        {"quota_mode": True},
        {"foo": 10},
        ["foo", "regular"],
        "OK",
        [("OVER", 10, 0), ("OK", 5, 4)],
        0,
    ),
    (
        "TestServicePerDescriptorQuotaMode",
        {},
        {"regular": 5, "quota": 1},
        ["regular", "quota"],
        "OVER",
        [("OVER", 5, 0), ("OK", 3, 1)],
        0,
    ),
    (
        "TestServiceMixedPerDescriptorModes",
        {},
        {"regular": 3, "quota": 3},
        ["regular", "quota"],
        "OVER",
        [("OK", 5, 1), ("OVER", 3, 0)],
        0,
    ),
    (
        "TestServiceMixedPerDescriptorModesUnderLimit",
        {},
        {"regular": 3, "quota": 1},
        ["regular", "quota"],
        "OK",
        [("OK", 5, 1), ("OK", 3, 1)],
        0,
    ),
    (
        "TestServiceQuotaModeOnlyAllOverTheLimit",
        {},
        {"quota1": 5, "quota2": 3},
        ["quota1", "quota2"],
        "OVER",
        [("OVER", 5, 0), ("OVER", 3, 0)],
        0,
    ),
    (
        "TestServiceQuotaModeOnlySomeOverTheLimit",
        {},
        {"quota1": 5, "quota2": 1},
        ["quota1", "quota2"],
        "OK",
        [("OVER", 5, 0), ("OK", 3, 1)],
        0,
    ),
    (
        "TestServiceQuotaModeWithShadowMode",
        {"shadow_mode": True},
        {"quota1": 5, "quota2": 3},
        ["quota1", "quota2"],
        "OK",
        [("OVER", 5, 0), ("OVER", 3, 0)],
        1,
    ),
    (
        "TestServiceMixedModeWithShadowMode",
        {"shadow_mode": True},
        {"regular": 5, "quota": 3},
        ["regular", "quota"],
        "OK",
        [("OVER", 5, 0), ("OVER", 3, 0)],
        1,
    ),
]


@pytest.mark.parametrize("case", SERVICE_CASES, ids=lambda c: c[0])
async def test_service_case(case: Any) -> None:
    _name, settings, filled, keys, want_overall, want_statuses, global_shadow = case
    lim = limiter(**settings)
    for key, count in filled.items():
        await fill(lim, key, count)
    resp = await lim.should_rate_limit(request("d", *(descriptor((k, "x")) for k in keys)))
    assert (overall(resp), statuses(resp)) == (want_overall, want_statuses)
    assert sample(lim, "global_shadow_mode_total") == global_shadow


@pytest.mark.parametrize(
    ("names", "expected"),
    [
        (None, ["RateLimit-Limit", "RateLimit-Remaining", "RateLimit-Reset"]),
        (
            ResponseHeaders(
                limit="A-Ratelimit-Limit",
                remaining="A-Ratelimit-Remaining",
                reset="A-Ratelimit-Reset",
            ),
            ["A-Ratelimit-Limit", "A-Ratelimit-Remaining", "A-Ratelimit-Reset"],
        ),
    ],
)
async def test_response_headers(names: ResponseHeaders | None, expected: list[str]) -> None:
    """TestServiceWithDefaultRatelimitHeaders / TestServiceWithCustomRatelimitHeaders."""
    lim = limiter(response_headers=names or ResponseHeaders())
    await fill(lim, "foo", 10)
    resp = await lim.should_rate_limit(
        request("d", descriptor(("foo", "x")), descriptor(("hello", "x")))
    )
    assert overall(resp) == "OVER"
    assert [(h.key, h.value) for h in resp.response_headers_to_add] == list(
        zip(expected, ["10", "0", "58"], strict=True)
    )


async def test_response_headers_pick_least_remaining() -> None:
    """ratelimit.go: the descriptor closest to its limit (with a current limit) is reported."""
    lim = limiter(response_headers=ResponseHeaders())
    await fill(lim, "regular", 2)
    resp = await lim.should_rate_limit(
        request(
            "d", descriptor(("foo", "x")), descriptor(("regular", "x")), descriptor(("baz", "x"))
        )
    )
    assert [(h.key, h.value) for h in resp.response_headers_to_add] == [
        ("RateLimit-Limit", "5"),
        ("RateLimit-Remaining", "2"),
        ("RateLimit-Reset", "58"),
    ]


async def test_no_response_headers_by_default() -> None:
    lim = limiter()
    resp = await lim.should_rate_limit(request("d", descriptor(("foo", "x"))))
    assert list(resp.response_headers_to_add) == []


@pytest.mark.parametrize(
    ("domain", "descriptors", "message"),
    [
        ("", [descriptor(("hello", "world"))], "rate limit domain must not be empty"),
        ("d", [], "rate limit descriptor list must not be empty"),
    ],
    ids=["TestEmptyDomain", "TestEmptyDescriptors"],
)
async def test_invalid_requests(domain: str, descriptors: list[Any], message: str) -> None:
    with pytest.raises(RateLimitError) as info:
        await limiter().should_rate_limit(request(domain, *descriptors))
    assert info.value.code == "invalid_request"
    assert str(info.value) == message


# (upstream test, counters to fill, request keys, the "metadata" field expected or None)
METADATA_CASES = [
    (
        "TestMetadataReturnedForPassedDescriptors",
        {"quota": 3},
        ["regular", "quota"],
        {"name": "service_1"},
    ),
    (
        "TestMetadataReturnedForAllPassedDescriptors",
        {},
        ["quota1", "quota2"],
        {"name": "service_1", "some_other_name": "service_2", "nested": {"a": 1.0}},
    ),
    (
        "TestOverlappingMetadataReturnsTheFirstValue",
        {},
        ["quota1", "quota3", "quota2"],
        {"name": "service_1", "nested": {"a": 2.0, "b": 3.0}, "some_other_name": "service_2"},
    ),
    ("no passed descriptor has metadata", {}, ["foo", "hello"], None),
]


@pytest.mark.parametrize("case", METADATA_CASES, ids=lambda c: c[0])
async def test_response_dynamic_metadata(case: Any) -> None:
    _name, filled, keys, expected = case
    lim = limiter(quota_mode=True, dynamic_metadata=True)
    for key, count in filled.items():
        await fill(lim, key, count)
    resp = await lim.should_rate_limit(request("d", *(descriptor((k, "x")) for k in keys)))
    found = MessageToDict(resp.dynamic_metadata)
    assert found.get("metadata") == expected
    assert found["domain"] == "d"
    assert found["descriptors"] == [{"entries": [f"{k}=x"]} for k in keys]


async def test_dynamic_metadata_hits_addend_and_override() -> None:
    """ratelimitToMetadata: request and descriptor hits_addend, the override as a string."""
    lim = limiter(dynamic_metadata=True)
    d = descriptor(("foo", "x"), hits_addend=2)
    d.limit.requests_per_unit = 7
    d.limit.unit = ratelimit_unit_pb2.RateLimitUnit.HOUR
    resp = await lim.should_rate_limit(request("d", d, descriptor(("b", "")), hits_addend=3))
    found = MessageToDict(resp.dynamic_metadata)
    assert found["hitsAddend"] == 3
    assert found["descriptors"][0]["hitsAddend"] == 2
    assert found["descriptors"][0]["limit"] == "requests_per_unit: 7 unit: HOUR"  # DIFFERS: Go's
    # String() of the override is unstable by design; Legation writes protobuf text format
    assert found["descriptors"][1] == {"entries": ["b="]}


async def test_no_dynamic_metadata_by_default() -> None:
    resp = await limiter().should_rate_limit(request("d", descriptor(("foo", "x"))))
    assert not resp.HasField("dynamic_metadata")


# -- test/redis/fixed_cache_impl_test.go: remaining and the near/over-limit split ------------------

NEAR = """
domain: d
descriptors:
  - {key: l8, rate_limit: {unit: second, requests_per_unit: 8}}
  - {key: l10, rate_limit: {unit: second, requests_per_unit: 10}}
  - {key: l15, rate_limit: {unit: hour, requests_per_unit: 15}}
  - {key: l20, rate_limit: {unit: second, requests_per_unit: 20}}
"""

# (upstream case, key, counter before, hits_addend, code, remaining,
#  total, over, near, within) -- counter deltas of this one request
NEAR_CASES = [
    ("TestRedis", "l10", 4, 1, "OK", 5, 1, 0, 0, 1),
    ("TestNearLimit/below-near", "l15", 10, 1, "OK", 4, 1, 0, 0, 1),
    ("TestNearLimit/near", "l15", 12, 1, "OK", 2, 1, 0, 1, 1),
    ("TestNearLimit/over", "l15", 15, 1, "OVER", 0, 1, 1, 0, 0),
    ("TestNearLimit/addend-under-near", "l20", 2, 3, "OK", 15, 3, 0, 0, 3),
    ("TestNearLimit/addend-some-near", "l8", 5, 2, "OK", 1, 2, 0, 1, 2),
    ("TestNearLimit/addend-all-near", "l20", 16, 3, "OK", 1, 3, 0, 3, 3),
    ("TestNearLimit/addend-some-over", "l20", 19, 3, "OVER", 0, 3, 2, 1, 0),
    ("TestNearLimit/addend-all-three", "l20", 15, 7, "OVER", 0, 7, 2, 4, 0),
    ("TestNearLimit/addend-all-over", "l10", 27, 3, "OVER", 0, 3, 3, 0, 0),
    ("TestOverLimitWithLocalCache/again-over", "l15", 16, 1, "OVER", 0, 1, 1, 0, 0),
    ("TestRedis/addend-0-over", "l10", 11, 0, "OVER", 0, 0, 0, 0, 0),
]


@pytest.mark.parametrize("case", NEAR_CASES, ids=lambda c: c[0])
async def test_near_and_over_limit_split(case: Any) -> None:
    _name, key, before, addend, code, remaining, total, over, near, within = case
    lim = limiter(NEAR, now=1234.0)
    await fill(lim, key, before)
    names = ("total_hits_total", "over_limit_total", "near_limit_total", "within_limit_total")
    labels = {"domain": "d", "descriptor": f"d.{key}"}
    start = [sample(lim, n, **labels) for n in names]
    resp = await lim.should_rate_limit(request("d", descriptor((key, "x"), hits_addend=addend)))
    assert statuses(resp)[0][0::2] == (code, remaining)
    deltas = [sample(lim, n, **labels) - s for n, s in zip(names, start, strict=True)]
    assert deltas == [total, over, near, within]


async def test_shadow_rule_counts_shadow_hits() -> None:
    """TestOverLimitWithLocalCacheShadowRule: over the limit in shadow mode answers OK with 0
    remaining and counts over_limit and shadow_mode."""
    lim = limiter()
    await fill(lim, "sh", 1)
    resp = await lim.should_rate_limit(request("d", descriptor(("sh", "x"))))
    assert statuses(resp) == [("OK", 1, 0)] and overall(resp) == "OK"
    labels = {"domain": "d", "descriptor": "d.sh"}
    assert sample(lim, "shadow_mode_total", **labels) == 1
    assert sample(lim, "over_limit_total", **labels) == 1


async def test_per_descriptor_hits_addend_zero_checks_only() -> None:
    """TestRedis: hits_addend 0 on one descriptor checks without counting; a sibling with no
    limit answers OK with no current limit."""
    lim = limiter()
    await lim.should_rate_limit(
        request(
            "d",
            descriptor(("key3", "value3"), hits_addend=11),
            descriptor(("key3", "value3"), ("subkey3", "subvalue3"), hits_addend=12),
        )
    )
    resp = await lim.should_rate_limit(
        request(
            "d",
            descriptor(("key3", "value3"), hits_addend=0),
            descriptor(("key3", "value3"), ("subkey3", "subvalue3"), hits_addend=1),
            descriptor(("key2", "value2"), hits_addend=0),
        )
    )
    assert statuses(resp) == [("OVER", 10, 0), ("OVER", 10, 0), ("OK", None, 0)]
    assert sample(lim, "total_hits_total", domain="d", descriptor="d.key3_value3") == 11


async def test_duration_until_reset_in_whole_seconds() -> None:
    """utils.CalculateReset: unit seconds minus now (whole seconds) modulo the unit."""
    lim = limiter(now=2222.5)
    resp = await lim.should_rate_limit(request("d", descriptor(("foo", "x"))))
    reset = resp.statuses[0].duration_until_reset
    assert (reset.seconds, reset.nanos) == (58, 0)


async def test_requests_per_unit_zero_refuses() -> None:
    """config_impl.go: a rate_limit without requests_per_unit limits to 0."""
    resp = await limiter().should_rate_limit(request("d", descriptor(("zero", "x"))))
    assert statuses(resp) == [("OVER", 0, 0)]


# -- test/limiter/base_limiter_test.go: which values share a counter ----------------------------


@pytest.mark.parametrize(
    ("key", "values", "codes"),
    [
        ("files", ["files/a.pdf", "files/b.csv", "files/c.txt"], ["OK", "OK", "OVER"]),
        ("pics", ["pics/a", "pics/b", "pics/c"], ["OK", "OK", "OK"]),
    ],
    ids=["TestGenerateCacheKeysWithShareThreshold", "wildcard-without-share_threshold"],
)
async def test_wildcard_counters(key: str, values: list[str], codes: list[str]) -> None:
    lim = limiter()
    got = [overall(await lim.should_rate_limit(request("d", descriptor((key, v))))) for v in values]
    assert got == codes


async def test_middle_wildcard_limits() -> None:
    """TestWildcardConfig: bar*b matches barab and bar123b (one limit each, per value)."""
    lim = limiter()
    for value in ("barab", "bar123b"):
        await lim.should_rate_limit(request("d", descriptor(("midWild", value))))
        resp = await lim.should_rate_limit(request("d", descriptor(("midWild", value))))
        assert overall(resp) == "OVER"
    resp = await lim.should_rate_limit(request("d", descriptor(("midWild", "bara"))))
    assert statuses(resp) == [("OK", None, 0)]


async def test_detailed_metric_counts_per_value() -> None:
    lim = limiter()
    await lim.should_rate_limit(request("d", descriptor(("key7", "v1"))))
    assert sample(lim, "total_hits_total", domain="d", descriptor="d.key7_v1") == 1


async def test_replaced_limit_is_neither_checked_nor_counted() -> None:
    """ratelimit.go constructLimitsToCheck: a limit named in a matched `replaces` is dropped."""
    lim = limiter()
    for _ in range(3):
        resp = await lim.should_rate_limit(
            request("d", descriptor(("named", "x")), descriptor(("replacer", "x")))
        )
    assert statuses(resp) == [("OK", None, 0), ("OK", 100, 97)]


@pytest.mark.parametrize("entries", [(), (("", "v"),)], ids=["no-entries", "empty-key"])
async def test_descriptor_matching_nothing_is_ok(entries: tuple[tuple[str, str], ...]) -> None:
    """config_impl.go GetLimit: a descriptor that matches nothing (even an empty one) has no
    limit; the request is answered, not refused."""
    resp = await limiter().should_rate_limit(
        request("d", descriptor(*entries), descriptor(("foo", "x")))
    )
    assert statuses(resp) == [("OK", None, 0), ("OK", 10, 9)]


# -- TestConfigLimitOverride ----------------------------------------------------------------------


def override(d: Any, rpu: int, unit: int) -> Any:
    d.limit.requests_per_unit = rpu
    d.limit.unit = unit
    return d


async def test_override_needs_a_known_domain() -> None:
    lim = limiter()
    d = override(descriptor(("foo", "x")), 1, ratelimit_unit_pb2.RateLimitUnit.DAY)
    resp = await lim.should_rate_limit(request("foo_domain", d))
    assert statuses(resp) == [("OK", None, 0)]


async def test_override_counts_under_full_key_and_shares_the_window() -> None:
    lim = limiter()
    day = ratelimit_unit_pb2.RateLimitUnit.DAY
    entries = (("key1", "value1"), ("subkey1", "something"))
    resp = await lim.should_rate_limit(request("d", override(descriptor(*entries), 10, day)))
    assert statuses(resp) == [("OK", 10, 9)]
    # another requests_per_unit on the same entries and unit counts on the same counter
    resp = await lim.should_rate_limit(request("d", override(descriptor(*entries), 42, day)))
    assert statuses(resp) == [("OK", 42, 40)]
    key = "d.key1_value1.subkey1_something"
    assert sample(lim, "total_hits_total", domain="d", descriptor=key) == 2


async def test_override_ignores_shadow_mode() -> None:
    """config_impl.go: an override never runs in shadow mode."""
    lim = limiter()
    minute = ratelimit_unit_pb2.RateLimitUnit.MINUTE
    for _ in range(2):
        resp = await lim.should_rate_limit(
            request("d", override(descriptor(("sh", "x")), 1, minute))
        )
    assert statuses(resp) == [("OVER", 1, 0)]


async def test_merged_domains_answer() -> None:
    """TestDomainMerge through the limiter: both files' descriptors limit."""
    config = load_texts(
        [
            (
                "a.yaml",
                "domain: d\ndescriptors: [{key: a, rate_limit: {unit: minute, "
                "requests_per_unit: 1}}]\n",
            ),
            (
                "b.yaml",
                "domain: d\ndescriptors: [{key: b, rate_limit: {unit: minute, "
                "requests_per_unit: 2}}]\n",
            ),
        ],
        merge_domains=True,
    )
    lim = limiter()
    lim.swap(config)
    resp = await lim.should_rate_limit(request("d", descriptor(("a", "x")), descriptor(("b", "y"))))
    assert statuses(resp) == [("OK", 1, 0), ("OK", 2, 1)]


def test_settings_carry_upstream_switches(tmp_path: Any) -> None:
    """Upstream's environment switches as service settings: SHADOW_MODE, QUOTA_MODE,
    MERGE_DOMAIN_CONFIG, LIMIT_RESPONSE_HEADERS_ENABLED (+ header names),
    RESPONSE_DYNAMIC_METADATA."""
    from prometheus_client import CollectorRegistry

    from legation.ratelimit.metrics import RateLimitMetrics
    from legation.ratelimit.service import Settings, build_limiter
    from legation.ratelimit.watch import ConfigWatcher

    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text(
        "domain: d\ndescriptors: [{key: a, rate_limit: {unit: minute, requests_per_unit: 1}}]\n"
    )
    b.write_text(
        "domain: d\ndescriptors: [{key: b, rate_limit: {unit: minute, requests_per_unit: 1}}]\n"
    )
    registry = CollectorRegistry()
    settings = Settings(
        config_files=(str(a), str(b)),
        merge_domains=True,
        shadow_mode=True,
        quota_mode=True,
        response_headers=True,
        header_limit="X-Limit",
        response_dynamic_metadata=True,
        registry=registry,
    )
    watcher = ConfigWatcher(
        settings.config_files,
        lambda c: None,
        metrics=RateLimitMetrics.for_registry(registry),
        merge_domains=settings.merge_domains,
    )
    lim = build_limiter(settings, watcher.load())
    assert lim.config.match("d", [("b", "x")]) is not None
    assert (lim.shadow_mode, lim.quota_mode, lim.dynamic_metadata) == (True, True, True)
    assert lim.response_headers == ResponseHeaders(limit="X-Limit")
