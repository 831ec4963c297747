"""Merging the workers' metrics: counters and histograms summed, gauges kept per worker."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from legation._worker_metrics import merge


def _worker(hits: int, latency: float, memory: float) -> str:
    registry = CollectorRegistry()
    counter = Counter("legation_x_hits", "hits", ["route"], registry=registry)
    counter.labels("a").inc(hits)
    counter.labels("b").inc(1)
    Histogram("legation_x_seconds", "latency", registry=registry).observe(latency)
    Gauge("legation_x_memory_bytes", "memory", registry=registry).set(memory)
    return generate_latest(registry).decode()


def test_counters_and_histograms_add_up_gauges_stay_per_worker() -> None:
    registry = CollectorRegistry()
    families = merge([(0, _worker(3, 0.004, 10)), (1, _worker(4, 0.2, 20))])

    class Fixed:
        def collect(self) -> list[object]:
            return list(families)

    registry.register(Fixed())  # type: ignore[arg-type]
    text = generate_latest(registry).decode()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }
    assert samples[("legation_x_hits_total", (("route", "a"),))] == 7
    assert samples[("legation_x_hits_total", (("route", "b"),))] == 2
    assert samples[("legation_x_seconds_count", ())] == 2
    assert samples[("legation_x_seconds_bucket", (("le", "0.005"),))] == 1
    assert samples[("legation_x_seconds_bucket", (("le", "+Inf"),))] == 2
    assert samples[("legation_x_memory_bytes", (("worker", "0"),))] == 10
    assert samples[("legation_x_memory_bytes", (("worker", "1"),))] == 20
    # one family per name: the merged text is valid exposition
    assert text.count("# TYPE legation_x_hits_total counter") == 1
