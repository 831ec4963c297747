"""The answer to a message whose hooks recorded nothing is built without walking the mutations
(``_wire.response`` returns ``passthrough``); it must be what the full build gives."""

from __future__ import annotations

import pytest
from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode

from legation.extproc import _wire
from legation.extproc.exchange import Exchange
from legation.extproc.sdk import Phase


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
