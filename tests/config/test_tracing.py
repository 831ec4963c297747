"""The tracing block: collector addresses, defaults, and the parser fuzzed."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from legation.config.tracing import Tracing, tracing_tls
from tests.config.meshdata import base, parse


@pytest.mark.parametrize(
    ("collector", "address"),
    [
        ("embedded", ("127.0.0.1", 4317)),
        ("127.0.0.1:4317", ("127.0.0.1", 4317)),
        ("jaeger:4317", ("jaeger", 4317)),
        ("otel-collector.observability.svc:55680", ("otel-collector.observability.svc", 55680)),
        ("[::1]:4317", ("::1", 4317)),
    ],
)
def test_collector_addresses(collector: str, address: tuple[str, int]) -> None:
    assert Tracing(collector=collector).address() == address


def test_defaults_trace_everything_into_the_embedded_receiver() -> None:
    data = base()
    data["tracing"] = {}
    t = parse(data).tracing
    assert t is not None and t.embedded
    assert (t.sampling, t.trace_cap, t.span_cap, t.address()) == (
        100.0,
        1000,
        20_000,
        ("127.0.0.1", 4317),
    )


@pytest.mark.parametrize(
    "bad", ["", "host", "host:", ":4317", "host:0", "host:65536", "h st:1", "a/b:1", "[x]:1"]
)
def test_bad_collectors_are_refused(bad: str) -> None:
    with pytest.raises(ValidationError, match="expected 'embedded' or host:port"):
        Tracing(collector=bad)


@given(st.text(max_size=80))
def test_any_collector_string_parses_or_is_refused_cleanly(text: str) -> None:
    try:
        t = Tracing(collector=text)
    except ValidationError as err:
        assert len(err.errors()) == 1
        return
    host, port = t.address()
    assert 1 <= port <= 65535
    assert host and not any(c in host for c in " /\r\n\t@")


@pytest.mark.parametrize(
    ("mode", "block", "expected"),
    [
        ("strict", {}, True),
        ("permissive", {}, True),
        ("off", {}, False),
        ("strict", {"tls": "none"}, False),
        ("strict", {"tls": "mesh"}, True),
        ("strict", {"collector": "jaeger:4317"}, False),
    ],
)
def test_the_receivers_hop_is_mesh_mtls_by_default_in_an_mtls_mesh(
    mode: str, block: dict[str, str], expected: bool
) -> None:
    data = base()
    data["mtls"] = {"mode": mode}
    data["tracing"] = block
    assert tracing_tls(parse(data)) is expected


def test_an_access_log_service_without_tls_needs_no_certificate_for_spans() -> None:
    data = base()
    data["mtls"] = {"mode": "strict"}
    data["tracing"] = {}
    data["accesslog"] = {"port": 18013, "tls": "none"}  # it records no spans
    assert tracing_tls(parse(data))
