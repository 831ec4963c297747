"""The answer to a message whose hooks recorded nothing is built without walking the mutations
(``_wire.response`` returns ``passthrough``); it must be what the full build gives."""

from __future__ import annotations

import sys
import threading
from typing import Any

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from legation._protowire import serialize
from legation.extproc import _wire
from legation.extproc.chain import Chain
from legation.extproc.config import Chains
from legation.extproc.exchange import Exchange
from legation.extproc.guard import ErrorGuard
from legation.extproc.metrics import Metrics
from legation.extproc.processor import Processor
from legation.extproc.sdk import BodyMode, Phase


@pytest.mark.parametrize("phase", list(Phase))
@pytest.mark.parametrize("empty", [None, {}])
def test_nothing_recorded_is_the_full_answer(phase: Phase, empty: dict[str, str] | None) -> None:
    ex = Exchange("c")
    ex.begin(phase)
    ex._metadata, ex._mode = empty, empty  # what the hooks left: nothing
    fast = _wire.response(phase, ex, ProcessingMode())
    assert fast == _wire.built(phase, ex, ProcessingMode())
    assert fast.WhichOneof("response") == phase.value


def test_a_recorded_change_still_takes_the_full_build() -> None:
    ex = Exchange("c")
    ex.begin(Phase.REQUEST_HEADERS)
    ex.set_header("x-a", "1")
    answer = _wire.response(Phase.REQUEST_HEADERS, ex, ProcessingMode())
    mutation = answer.request_headers.response.header_mutation
    assert [h.header.key for h in mutation.set_headers] == ["x-a"]
    ex.begin(Phase.REQUEST_HEADERS)
    ex.clear_route_cache()
    assert _wire.response(
        Phase.REQUEST_HEADERS, ex, ProcessingMode()
    ).request_headers.response.clear_route_cache


@pytest.mark.parametrize("phase", list(Phase))
def test_the_shared_answers_bytes_are_their_encoding(phase: Phase) -> None:
    """The gRPC servicer writes WIRE's bytes for the shared answers: they must be the answer."""
    answer = _wire.passthrough(phase)
    assert _wire.WIRE[id(answer)] == answer.SerializeToString()
    assert serialize(_wire.WIRE[id(answer)]) == answer.SerializeToString()
    assert pb.ProcessingResponse.FromString(_wire.WIRE[id(answer)]).WhichOneof("response") == (
        phase.value
    )


# -- headers read when a hook first looks -----------------------------------------------------

_NAMES = st.sampled_from([":path", "cookie", "x-a", "X-B", "accept"])
_HEADERS = st.lists(st.tuples(_NAMES, st.binary(max_size=8), st.text(max_size=4)), max_size=8)


def _chain_c(
    filters: list[Any], registry: CollectorRegistry | None = None
) -> tuple[Processor, ErrorGuard]:
    """A processor serving ``filters`` as chain ``c``, and that chain's guard."""
    processor = Processor(
        Chains(chains={"c": Chain(name="c", filters=filters)}),
        metrics=Metrics(registry if registry is not None else CollectorRegistry()),
        message_timeout=0.2,
    )
    guard = processor.guard("c")
    assert guard is not None
    return processor, guard


def _header_map(headers: list[tuple[str, bytes, str]]) -> base_pb2.HeaderMap:
    out = base_pb2.HeaderMap()
    for key, raw, value in headers:
        out.headers.add(key=key, raw_value=raw, value=value)
    return out


def _read_now(headers: list[tuple[str, bytes, str]]) -> dict[str, str]:
    """What an eager read gives: each value (raw_value when set, UTF-8 with replacement, else
    value), repeated names joined with ',' ('; ' for cookie)."""
    out: dict[str, str] = {}
    for key, raw, value in headers:
        text = raw.decode("utf-8", "replace") if raw else value
        if key in out:
            out[key] = f"{out[key]}; {text}" if key == "cookie" else f"{out[key]},{text}"
        else:
            out[key] = text
    return out


class _Seen:
    """A filter that looks only at the response: what it sees of both sides."""

    name = "seen"
    inline = True
    phases = frozenset({Phase.RESPONSE_HEADERS, Phase.RESPONSE_TRAILERS})
    body_mode = BodyMode.BUFFERED

    def __init__(self) -> None:
        self.seen: list[tuple[dict[str, str], ...]] = []

    def on_response_headers(self, ex: Exchange) -> None:
        self.seen.append((dict(ex.request_headers), dict(ex.headers)))

    def on_response_trailers(self, ex: Exchange) -> None:
        self.seen.append((dict(ex.trailers),))


@settings(max_examples=60, deadline=None)
@given(request=_HEADERS, response=_HEADERS, first=_HEADERS, second=_HEADERS)
async def test_headers_read_late_are_the_headers_sent(request, response, first, second) -> None:  # type: ignore[no-untyped-def]
    """Nothing reads the request headers in the request phase; a response hook then sees them
    as sent, the response headers as ``headers``, and only the latest trailers."""
    seen = _Seen()
    processor, guard = _chain_c([seen])
    ex = Exchange("c")
    for which, field, headers in (
        ("request_headers", "headers", request),
        ("response_headers", "headers", response),
        ("response_trailers", "trailers", first),
        ("response_trailers", "trailers", second),
    ):
        message = pb.ProcessingRequest()
        getattr(getattr(message, which), field).CopyFrom(_header_map(headers))
        await processor.answer(guard, ex, message)
    assert seen.seen == [
        (_read_now(request), _read_now(response)),
        (_read_now(first),),
        (_read_now(second),),
    ]


def test_two_threads_reading_the_headers_both_see_them_whole() -> None:
    """Threaded hooks (or an async hook's own threads) may read an exchange's headers at the
    same moment: neither may see a dict half read (an attacker's review: 76 of 300 did)."""
    sent = [(f"x-h{i}", f"v{i}".encode(), "") for i in range(400)]
    whole = _read_now(sent)
    header_map = _header_map(sent)
    bad = 0
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads switch as often as they can: the window is open
    try:
        trials = _trials(header_map)
    finally:
        sys.setswitchinterval(interval)
    bad = sum(n != len(whole) for n in trials)
    assert bad == 0


def _trials(header_map: base_pb2.HeaderMap) -> list[int]:
    """Headers each of two threads saw, reading one new exchange at once, 150 times over."""
    out: list[int] = []
    for _ in range(150):
        ex = Exchange("c")
        ex._received("request", header_map)
        start = threading.Barrier(2)
        seen: list[int] = []

        def read(
            ex: Exchange = ex, start: threading.Barrier = start, seen: list[int] = seen
        ) -> None:
            start.wait()
            seen.append(len(ex.request_headers))

        threads = [threading.Thread(target=read) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        out += seen
    return out


REQUEST_SIDE, RESPONSE_SIDE = {":path": "/a"}, {":status": "200"}


@pytest.mark.parametrize(
    ("phases", "expected"),
    [
        # after the response headers, a request body or trailers phase works on the request's
        (
            ["request_headers", "response_headers", "request_body", "request_trailers"],
            [REQUEST_SIDE, RESPONSE_SIDE, REQUEST_SIDE, REQUEST_SIDE],
        ),
        # a response body without its headers (they were skipped): the response side, empty
        (["request_headers", "response_body"], [REQUEST_SIDE, {}]),
    ],
)
async def test_headers_are_the_current_phases_side(
    phases: list[str], expected: list[dict[str, str]]
) -> None:
    seen: list[dict[str, str]] = []

    class Look:
        name = "look"
        inline = True
        phases = frozenset(Phase)
        body_mode = BodyMode.BUFFERED

        def __getattr__(self, hook: str) -> Any:
            if not hook.startswith("on_"):
                raise AttributeError(hook)
            return lambda ex: seen.append(dict(ex.headers))

    processor, guard = _chain_c([Look()])
    ex = Exchange("c")
    for which in phases:
        message = pb.ProcessingRequest()
        part = getattr(message, which)
        if which.endswith("_headers"):
            side = REQUEST_SIDE if which == "request_headers" else RESPONSE_SIDE
            part.headers.CopyFrom(_header_map([(k, v.encode(), "") for k, v in side.items()]))
        else:
            part.SetInParent()
        await processor.answer(guard, ex, message)
    assert seen == expected


class _Answers:
    """Answers every request itself (the filters after it do not run)."""

    name = "answers"
    inline = True
    phases = frozenset({Phase.REQUEST_HEADERS})
    body_mode = BodyMode.BUFFERED

    def on_request_headers(self, ex: Exchange) -> None:
        ex.respond(403)


class _Raises(_Answers):
    name = "raises"

    def on_request_headers(self, ex: Exchange) -> None:
        raise RuntimeError("a filter's bug")


@pytest.mark.parametrize(
    ("filters", "timed"),
    [
        ([_Answers(), _Raises()], {"answers": 1, "raises": 0}),  # the second never ran
        ([_Raises(), _Answers()], {"raises": 1, "answers": 0}),  # the raise was timed too
    ],
)
async def test_one_message_counts_its_phase_once_and_times_the_filters_that_ran(
    filters: list[Any], timed: dict[str, int]
) -> None:
    registry = CollectorRegistry()
    processor, guard = _chain_c(filters, registry)
    for _ in range(3):
        message = pb.ProcessingRequest()
        message.request_headers.SetInParent()
        await processor.answer(guard, Exchange("c"), message)
    phase = {"chain": "c", "phase": "request_headers"}
    assert registry.get_sample_value("legation_extproc_phases_total", phase) == 3
    for name, runs in timed.items():
        count = registry.get_sample_value(
            "legation_extproc_filter_seconds_count", {"filter": name, "phase": "request_headers"}
        )
        assert (count or 0) == 3 * runs
