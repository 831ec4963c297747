"""The rate-limit answer as bytes: the hand-written encoding against protobuf's, the fast path
against the general one, and what reaches the service as bytes it cannot parse."""

from __future__ import annotations

import grpc
import pytest
from envoy.service.ratelimit.v3 import rls_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from legation.errors import ConfigError
from legation.ratelimit import _wire
from legation.ratelimit import service as rl
from legation.ratelimit.config import RateLimitConfig, parse
from legation.ratelimit.errors import RateLimitError
from legation.ratelimit.limiter import OK, OVER_LIMIT
from tests.ratelimit.conftest import FakeClock, descriptor, make_limiter, request

_Status = rls_pb2.RateLimitResponse.DescriptorStatus
_UNITS = [v for _, v in rls_pb2.RateLimitResponse.RateLimit.Unit.items()]
UINT32 = st.integers(0, 2**32 - 1)


@given(
    code=st.sampled_from([OK, OVER_LIMIT]),
    name=st.text(max_size=40),
    rpu=UINT32,
    unit=st.sampled_from(_UNITS),
    remaining=UINT32,
    seconds=st.integers(-(2**63), 2**63 - 1),
    nanos=st.integers(-999_999_999, 999_999_999),
)
def test_a_status_is_encoded_as_protobuf_encodes_it(  # type: ignore[no-untyped-def]
    code, name, rpu, unit, remaining, seconds, nanos
) -> None:
    ours = _wire.overall(code) + _wire.status(
        code, _wire.limit_field(name, rpu, unit), remaining, seconds, nanos
    )
    theirs = rls_pb2.RateLimitResponse(overall_code=code)
    status = theirs.statuses.add(code=code, limit_remaining=remaining)
    status.current_limit.name, status.current_limit.requests_per_unit = name, rpu
    status.current_limit.unit = unit  # type: ignore[assignment]
    status.duration_until_reset.seconds, status.duration_until_reset.nanos = seconds, nanos
    assert rls_pb2.RateLimitResponse.FromString(ours) == theirs
    assert ours == theirs.SerializeToString()


@given(code=st.sampled_from([OK, OVER_LIMIT]), remaining=UINT32)
def test_a_status_without_a_limit_is_encoded_as_protobuf_encodes_it(code, remaining) -> None:  # type: ignore[no-untyped-def]
    theirs = rls_pb2.RateLimitResponse()
    theirs.statuses.add(code=code, limit_remaining=remaining)
    assert _wire.bare_status(code, remaining) == theirs.SerializeToString()


@given(st.integers(-(2**63), 2**64 - 1).filter(bool))
def test_varints_read_back(n: int) -> None:
    message = _Status()
    message.duration_until_reset.seconds = n if n < 2**63 else n - 2**64
    assert message.SerializeToString() == b"\x22" + bytes([1 + len(_wire.varint(n))]) + (
        b"\x08" + _wire.varint(n)
    )


# -- the fast path answers as the general one does ------------------------------------------

LIMITS = """
domain: d
descriptors:
  - key: small
    rate_limit: {unit: second, requests_per_unit: 3}
  - key: named
    rate_limit: {unit: minute, requests_per_unit: 5, name: five}
  - key: zero
    rate_limit: {unit: hour, requests_per_unit: 0}
  - key: slide
    rate_limit: {unit: second, requests_per_unit: 2, algorithm: sliding_window}
  - key: shadow
    shadow_mode: true
    rate_limit: {unit: second, requests_per_unit: 1}
  - key: free
    rate_limit: {unlimited: true}
"""
KEYS = ("small", "named", "zero", "slide", "shadow", "free", "nothing")
STEP = st.tuples(
    st.lists(st.tuples(st.sampled_from(KEYS), st.sampled_from("ab")), min_size=1, max_size=2),
    st.integers(0, 4),  # hits_addend (0: the default, 1)
    st.sampled_from([0.0, 0.1, 0.7, 1.0, 61.0]),  # seconds to the next request
)


def _limiter(fast: bool, clock: FakeClock, **modes: bool):  # type: ignore[no-untyped-def]
    parsed = parse(LIMITS, source="limits.yaml")
    return make_limiter(RateLimitConfig({"d": parsed}), clock=clock, fast_path=fast, **modes)


def _samples(limiter) -> list[tuple[str, list[tuple[str, str]], float]]:  # type: ignore[no-untyped-def]
    return sorted(
        (s.name, sorted(s.labels.items()), s.value)
        for metric in limiter.metrics.registry.collect()
        for s in metric.samples
        if not s.name.endswith("_created")
    )


@settings(max_examples=60, deadline=None)
@given(steps=st.lists(STEP, min_size=1, max_size=25), shadow=st.booleans())
async def test_the_fast_path_answers_and_counts_as_the_general_path(steps, shadow) -> None:  # type: ignore[no-untyped-def]
    clocks = FakeClock(1_700_000_000.25), FakeClock(1_700_000_000.25)
    fast, general = (
        _limiter(True, clocks[0], shadow_mode=shadow),
        _limiter(False, clocks[1], shadow_mode=shadow),
    )
    for entries, addend, wait in steps:
        req = request("d", *(descriptor(e) for e in entries), hits_addend=addend)
        raw = req.SerializeToString()
        assert await fast.answer(raw) == await general.answer(raw)
        for clock in clocks:
            clock.advance(wait)
    assert _samples(fast) == _samples(general)


async def test_the_fast_path_is_taken_for_one_fixed_window() -> None:
    """What the test above compares is worth comparing: its common shape takes the fast path."""
    lim = _limiter(True, FakeClock())
    raw = request("d", descriptor(("small", "a"))).SerializeToString()
    await lim.answer(raw)
    assert lim._plans[raw].fast is not None
    two = request("d", descriptor(("small", "a")), descriptor(("small", "b"))).SerializeToString()
    await lim.answer(two)
    assert lim._plans[two].fast is None


QUOTA = """
domain: d
descriptors:
  - key: k
    value: a
    rate_limit: {unit: hour, requests_per_unit: 1}
  - key: k
    value: b
    rate_limit: {unit: hour, requests_per_unit: 100}
"""


async def test_a_quota_mode_switched_on_applies_without_a_new_config() -> None:
    """Plans hold each descriptor's quota mode: switching the mode (as a live plan swap does)
    must not be hidden by plans made before it, even when the config object stays."""
    lim = make_limiter(QUOTA)
    req = request("d", descriptor(("k", "a")), descriptor(("k", "b")))
    assert (await lim.should_rate_limit(req)).overall_code == OK
    assert (await lim.should_rate_limit(req)).overall_code == OVER_LIMIT  # a is over
    lim.quota_mode = True  # over only when every descriptor is: b is not
    assert (await lim.should_rate_limit(req)).overall_code == OK
    lim.quota_mode = False
    assert (await lim.should_rate_limit(req)).overall_code == OVER_LIMIT


# -- bytes that are not a request -------------------------------------------------------------

NOT_REQUESTS = [
    b"\xff\xff\xff",  # a truncated varint
    b"\x0a\x05ab",  # a domain longer than the message
    b"\x0a\x02\xc3\x28",  # a domain that is not UTF-8
    b"\x12\x03\x0a\x01",  # a descriptor cut short
]


@pytest.mark.parametrize("raw", NOT_REQUESTS)
async def test_bytes_that_are_not_a_request_are_an_invalid_request(raw: bytes) -> None:
    lim = make_limiter("domain: d\ndescriptors:\n  - key: k\n")
    with pytest.raises(RateLimitError) as err:
        await lim.answer(raw)
    assert err.value.code == "invalid_request"


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64))
async def test_any_bytes_get_an_answer_or_an_invalid_request(raw: bytes) -> None:
    lim = make_limiter(QUOTA)
    try:
        answer = rls_pb2.RateLimitResponse.FromString(await lim.answer(raw))
    except RateLimitError as exc:
        assert exc.code == "invalid_request"
    else:
        assert answer.overall_code in (OK, OVER_LIMIT)


async def test_the_service_answers_bytes_that_are_not_a_request_with_invalid_argument(
    tmp_path,  # type: ignore[no-untyped-def]
) -> None:
    (tmp_path / "limits.yaml").write_text("domain: d\ndescriptors:\n  - key: k\n")
    server, port = await rl.start_server(
        rl.Settings(config_files=(str(tmp_path / "limits.yaml"),), registry=None)
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary(f"/{rl.SERVICE_NAME}/ShouldRateLimit")
            for raw in NOT_REQUESTS:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await call(raw, timeout=5)
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            ok = await call(request("d", descriptor(("k", "v"))).SerializeToString(), timeout=5)
            assert rls_pb2.RateLimitResponse.FromString(ok).overall_code == OK
    finally:
        await server.stop(None)


# -- what the plan table keeps (an attacker's review) ----------------------------------------


async def test_a_plan_keeps_nothing_of_the_callers_request_message() -> None:
    """A Python caller that reuses its message after a call must not change what a later call
    with the first call's bytes answers."""
    lim = make_limiter("domain: d\ndescriptors:\n  - key: k\n", dynamic_metadata=True)
    req = request("d", descriptor(("k", "a")))
    await lim.should_rate_limit(req)
    req.descriptors[0].entries[0].value = "changed"
    resp = await lim.should_rate_limit(request("d", descriptor(("k", "a"))))
    assert [e for d in resp.dynamic_metadata["descriptors"] for e in d["entries"]] == ["k=a"]


async def test_a_request_of_many_descriptors_is_planned_but_not_kept() -> None:
    """A plan costs per descriptor: requests of many are answered alike, their plans not kept."""
    lim = make_limiter(QUOTA)
    many = request("d", *(descriptor(("k", "b")) for _ in range(9)))
    few = request("d", *(descriptor(("k", "b")) for _ in range(8)))
    for req, left in ((many, 100 - 9), (few, 100 - 9 - 8)):  # one counter: k=b
        answer = await lim.should_rate_limit(req)
        assert answer.statuses[-1].limit_remaining == left
    assert list(lim._plans) == [few.SerializeToString()]


def test_a_limit_name_protobuf_cannot_carry_is_refused_at_load() -> None:
    doc = (
        "domain: d\ndescriptors:\n  - key: k\n"
        '    rate_limit: {unit: second, requests_per_unit: 1, name: "a\\ud800"}\n'
    )
    with pytest.raises(ConfigError) as err:
        parse(doc, source="limits.yaml")
    assert "limits.yaml" in str(err.value) and "rate_limit.name" in str(err.value)
    assert err.value.code == "invalid_text"
