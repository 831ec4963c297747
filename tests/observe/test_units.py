"""The aggregator, its windows, names and limits, the renderer and the Envoy config, in-process
(a fake clock; no Envoy)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from legation.observe.aggregator import Aggregator, Entry, Limits
from legation.observe.envoy_config import ObserveError, access_log
from legation.observe.names import LOCAL, OTHER, destination, label_value, source
from legation.observe.render import render
from legation.observe.window import BOUNDS_MS, HORIZON_S, SlidingWindow, bucket_of


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def entry(
    route: str = "r",
    cluster: str = "outbound|reviews",
    code: int = 200,
    ms: float = 4.0,
    node: str = "sidecar~a-1",
    log_name: str = "outbound",
) -> Entry:
    return Entry(
        node_id=node,
        node_cluster="a",
        log_name=log_name,
        route=route,
        upstream_cluster=cluster,
        code=code,
        duration_ms=ms,
    )


def test_windows_slide_and_totals_stay() -> None:
    clock = Clock()
    agg = Aggregator(windows=(10, 60), clock=clock)
    for _ in range(30):
        agg.record(entry())
    clock.now += 15
    for _ in range(10):
        agg.record(entry(code=503))
    (row,) = agg.snapshot().rows["route"]
    assert (row.windows[10].requests, row.windows[10].failures) == (10, 10)
    assert (row.windows[60].requests, row.windows[60].failures) == (40, 10)
    assert row.windows[60].success == 0.75 and row.windows[10].rps == 1.0
    clock.now += HORIZON_S
    (row,) = agg.snapshot().rows["route"]
    assert row.windows[60].requests == 0 and row.windows[60].success is None
    assert (row.total, row.total_failures) == (40, 10)


def test_a_slot_is_reused_after_the_horizon() -> None:
    w = SlidingWindow()
    w.record(5, 1.0, False)
    w.record(5 + HORIZON_S, 1.0, True)
    stats = w.stats(5 + HORIZON_S, HORIZON_S)
    assert (stats.requests, stats.failures) == (1, 1)


def test_percentiles_fall_in_the_bucket_of_the_samples() -> None:
    w = SlidingWindow()
    for i in range(100):
        w.record(1, 120.0 if i < 90 else 900.0, False)
    s = w.stats(1, 10)
    assert s.p50_ms is not None and s.p90_ms is not None and s.p99_ms is not None
    assert bucket_of(s.p50_ms) == bucket_of(120) and bucket_of(s.p90_ms) == bucket_of(120)
    assert bucket_of(s.p99_ms) == bucket_of(900)
    w.record(1, BOUNDS_MS[-1] * 2, False)
    assert w.stats(1, 10).p50_ms is not None


@pytest.mark.parametrize(
    ("cluster", "dest"),
    [
        ("outbound|reviews", "reviews"),
        ("outbound|reviews|v2", "reviews"),
        ("inbound|reviews", None),
        ("", LOCAL),
        ("upstream", "upstream"),
    ],
)
def test_destination_of_legation_cluster_names(cluster: str, dest: str | None) -> None:
    assert destination(cluster) == dest


def test_label_values_are_printable_and_short() -> None:
    assert source("", "sidecar~a-1") == "sidecar~a-1"
    assert label_value("a\nb\x00c") == "a_b_c"
    assert len(label_value("x" * 1000)) == 96 and label_value("x" * 1000).endswith("~")


def test_inbound_entries_count_for_the_proxy_only() -> None:
    agg = Aggregator(clock=Clock())
    agg.record(entry(cluster="inbound|a", log_name="inbound"))
    agg.record(entry(cluster="outbound|b"))
    snap = agg.snapshot()
    assert [r.total for r in snap.rows["proxy"]] == [2]
    assert [r.labels for r in snap.rows["pair"]] == [("a", "b")]
    assert [r.total for r in snap.rows["route"]] == [1]


def test_ten_thousand_invented_routes_stay_bounded() -> None:
    agg = Aggregator(clock=Clock(), limits=Limits(routes=50, pairs=20, proxies=10))
    for i in range(10_000):
        agg.record(entry(route=f"/users/{i}", cluster=f"outbound|svc{i}", node=f"n{i}"))
    snap = agg.snapshot()
    assert len(snap.rows["route"]) == 51 and len(snap.rows["pair"]) == 21
    assert len(snap.rows["proxy"]) == 11
    other = {r.labels: r.total for r in snap.rows["route"]}[(OTHER,)]
    assert other == 10_000 - 50 == snap.overflowed["route"]
    assert {r.labels: r.total for r in snap.rows["pair"]}[(OTHER, OTHER)] == 10_000 - 20


def test_idle_keys_make_room_before_other() -> None:
    clock = Clock()
    agg = Aggregator(clock=clock, limits=Limits(routes=2))
    agg.record(entry(route="a"))
    agg.record(entry(route="b"))
    clock.now += HORIZON_S
    agg.record(entry(route="c"))
    assert {r.labels for r in agg.snapshot().rows["route"]} == {("c",)}
    assert agg.snapshot().overflowed["route"] == 0


def test_render_is_a_stat_table() -> None:
    clock = Clock()
    agg = Aggregator(windows=(10,), clock=clock)
    for i in range(10):
        agg.record(entry(route="reviews-default", code=503 if i == 0 else 200, ms=4))
    agg.record(entry(route="idle"))
    clock.now += 11
    for _ in range(5):
        agg.record(entry(route="reviews-default", ms=4))
    text = render(agg.snapshot(), scopes=("route",))
    assert text == (
        "window 10s\n\n"
        "ROUTE            RPS  SUCCESS    P50    P90    P99\n"
        "reviews-default  0.5  100.00%  4.0ms  4.8ms  5.0ms\n"
    )
    assert render(json.loads(json.dumps(agg.snapshot().to_dict())), scopes=("route",)) == text


def test_render_without_requests_and_past_the_limit() -> None:
    agg = Aggregator(windows=(10,), clock=Clock())
    assert "(no requests)" in render(agg.snapshot(), scopes=("pair",))
    for i in range(5):
        agg.record(entry(route=f"r{i}"))
    assert render(agg.snapshot(), scopes=("route",), limit=3).endswith("... 2 more\n")
    with pytest.raises(ValueError, match="no 60 s window"):
        render(agg.snapshot(), window=60)


@pytest.mark.parametrize(
    "header", ["Authorization", "cookie", " Proxy-Authorization ", "set-cookie", "x-api-key"]
)
def test_credential_headers_are_never_configured(header: str) -> None:
    with pytest.raises(ObserveError) as err:
        access_log("outbound", request_headers=["x-request-id", header])
    assert err.value.code == "sensitive_header"
    assert str(err.value) == (
        f"access log request_headers: {header!r} carries credentials and is never logged"
    )
    with pytest.raises(ObserveError):
        access_log("outbound", response_headers=[header])


def test_access_log_config_carries_the_log_name_and_batching() -> None:
    from envoy.extensions.access_loggers.grpc.v3 import als_pb2

    log = access_log(
        "gateway",
        cluster="als",
        flush_interval_ms=250,
        buffer_size_bytes=4096,
        request_headers=["X-Request-Id"],
    )
    config = als_pb2.HttpGrpcAccessLogConfig()
    assert log.typed_config.Unpack(config)
    common = config.common_config
    assert (common.log_name, common.grpc_service.envoy_grpc.cluster_name) == ("gateway", "als")
    assert common.buffer_flush_interval.ToMilliseconds() == 250
    assert common.buffer_size_bytes.value == 4096
    assert list(config.additional_request_headers_to_log) == ["x-request-id"]


def test_the_table_renders_the_same_from_metrics_text() -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from legation.observe.prometheus import GoldenCollector, snapshot_from_text

    clock = Clock()
    agg = Aggregator(windows=(10, 60), clock=clock)
    for i in range(40):
        agg.record(
            entry(
                route=f"r{i % 3}",
                code=503 if i % 7 == 0 else 200,
                ms=i * 3.0,
                cluster=f"outbound|s{i % 2}",
            )
        )
    clock.now += 20
    agg.record(entry(route="late"))
    registry = CollectorRegistry()
    registry.register(GoldenCollector(agg))
    text = generate_latest(registry).decode() + "other_metric 1\n"
    rebuilt = snapshot_from_text(text)
    for window in (10, 60):
        assert render(rebuilt, window=window) == render(agg.snapshot(), window=window)
    assert rebuilt["overflowed"] == {"route": 0, "pair": 0, "proxy": 0}


def test_serve_accesslog_refuses_workers(capsys: pytest.CaptureFixture[str]) -> None:
    """One process aggregates the whole mesh: forked workers would each see a part."""
    from legation import cli

    assert cli.main(["serve", "accesslog", "--workers", "2"]) == 2
    assert "one process only" in capsys.readouterr().err


def test_service_lines_name_flags_as_envoy_and_write_only_mesh_nodes(tmp_path: Path) -> None:
    from envoy.data.accesslog.v3 import accesslog_pb2

    from legation.observe.jsonlines import JsonSink, line_of, response_flags

    flags = accesslog_pb2.ResponseFlags(fault_injected=True, upstream_request_timeout=True)
    assert response_flags(flags) == "UT,FI"
    assert response_flags(accesslog_pb2.ResponseFlags()) == "-"
    entry = accesslog_pb2.HTTPAccessLogEntry()
    entry.request.path = "/p?access_token=secret-in-query"
    entry.request.request_headers["traceparent"] = "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"
    line = line_of("sidecar-a", "inbound", entry)
    assert line["path"] == "/p" and line["trace_id"] == "ab" * 16
    sink = JsonSink({"sidecar-a": str(tmp_path / "a.jsonl")})
    sink.write("sidecar-a", "inbound", [entry])
    sink.write("../../etc/evil", "inbound", [entry])  # a node id the mesh does not name
    sink.close()
    assert [p.name for p in tmp_path.iterdir()] == ["a.jsonl"]
    assert "secret-in-query" not in (tmp_path / "a.jsonl").read_text()


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300), st.text(max_size=300), st.text(max_size=300))
def test_any_names_an_entry_claims_stay_printable_bounded_labels(
    route: str, cluster: str, node: str
) -> None:
    """A client of the access-log service chooses every name in an entry: whatever they are,
    labels stay printable and short, and the exposition parses back."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from legation.observe.prometheus import GoldenCollector

    agg = Aggregator(clock=lambda: 1000.0)
    agg.record(Entry(node, node, "outbound", route, cluster, 200, 1.0))
    registry = CollectorRegistry()
    registry.register(GoldenCollector(agg))
    text = generate_latest(registry).decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            for value in sample.labels.values():
                assert len(value) <= 96 and all(" " < c < "\x7f" for c in value), value
    render(agg.snapshot())
