"""Golden metrics for Prometheus, under one naming scheme.

For every scope of :data:`legation.observe.aggregator.SCOPES` (``route``, ``pair``, ``proxy``),
with that scope's labels (``route``; ``source``, ``destination``; ``proxy``):

======================================================  ======  ==================================
name                                                    type    meaning
======================================================  ======  ==================================
``legation_golden_<scope>_requests_total``              counter requests since the key appeared
``legation_golden_<scope>_failures_total``              counter of those, 5xx or no response
``legation_golden_<scope>_requests_per_second``         gauge   over the last ``window`` seconds
``legation_golden_<scope>_success_ratio``               gauge   non-5xx share over ``window``
``legation_golden_<scope>_latency_seconds``             gauge   ``quantile`` 0.5/0.9/0.99 over
                                                                ``window`` (bucket-interpolated)
``legation_golden_label_overflow_total``                counter entries counted under ``other``
                                                                because a scope was full (``scope``)
======================================================  ======  ==================================

Gauges carry a ``window`` label (seconds, e.g. ``"10"``, ``"60"``) and are absent for a key
without requests in that window. The counters are the ones to ``rate()`` in Prometheus; the
gauges are the aggregator's own sliding windows, as ``legation top`` shows them. Label values are
bounded per scope (:class:`legation.observe.aggregator.Limits`, ``other`` past them).

:func:`snapshot_from_text` reads these families back into a snapshot's dict form, so the
control plane can show golden metrics of a service process it only reaches through ``/metrics``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from legation.observe.aggregator import SCOPES, Aggregator

__all__ = ["PREFIX", "GoldenCollector", "metric_names", "snapshot_from_text"]

PREFIX = "legation_golden"
QUANTILES = (("0.5", "p50_ms"), ("0.9", "p90_ms"), ("0.99", "p99_ms"))


def metric_names() -> list[str]:
    """Every family name the collector exposes (counters without their ``_total``)."""
    names = [f"{PREFIX}_label_overflow"]
    for scope in SCOPES:
        names += [
            f"{PREFIX}_{scope}_{n}"
            for n in (
                "requests",
                "failures",
                "requests_per_second",
                "success_ratio",
                "latency_seconds",
            )
        ]
    return names


class GoldenCollector(Collector):
    """A custom collector reading one :class:`Aggregator` snapshot per scrape. Register it with
    ``registry.register(GoldenCollector(aggregator))``."""

    def __init__(self, aggregator: Aggregator) -> None:
        self.aggregator = aggregator

    def collect(self) -> Iterator[Metric]:
        snap = self.aggregator.snapshot()
        overflow = CounterMetricFamily(
            f"{PREFIX}_label_overflow",
            "Entries counted under 'other' (a scope was full)",
            labels=["scope"],
        )
        for scope in SCOPES:
            overflow.add_metric([scope], snap.overflowed.get(scope, 0))
        yield overflow
        for scope, labels in SCOPES.items():
            name = f"{PREFIX}_{scope}"
            wl = [*labels, "window"]
            total = CounterMetricFamily(
                f"{name}_requests", f"Requests per {scope}", labels=list(labels)
            )
            failures = CounterMetricFamily(
                f"{name}_failures",
                f"Requests per {scope} answered 5xx or not at all",
                labels=list(labels),
            )
            rps = GaugeMetricFamily(
                f"{name}_requests_per_second",
                f"Request rate per {scope} over the window",
                labels=wl,
            )
            success = GaugeMetricFamily(
                f"{name}_success_ratio", f"Non-5xx share per {scope} over the window", labels=wl
            )
            latency = GaugeMetricFamily(
                f"{name}_latency_seconds",
                f"Latency quantiles per {scope} over the window",
                labels=[*wl, "quantile"],
            )
            for row in snap.rows.get(scope, []):
                total.add_metric(list(row.labels), row.total)
                failures.add_metric(list(row.labels), row.total_failures)
                for window, stats in row.windows.items():
                    if not stats.requests:
                        continue
                    key = [*row.labels, str(window)]
                    rps.add_metric(key, stats.rps)
                    success.add_metric(key, stats.success or 0.0)
                    for q, attr in QUANTILES:
                        ms = getattr(stats, attr)
                        latency.add_metric([*key, q], math.inf if ms is None else ms / 1000)
            yield from (total, failures, rps, success, latency)


def snapshot_from_text(text: str, *, windows: Sequence[int] = (10, 60)) -> dict[str, Any]:
    """The ``Snapshot.to_dict()`` form rebuilt from this collector's exposition text (other
    families are ignored), so a process that only serves ``/metrics`` can be rendered by
    :func:`legation.observe.render.render`. Per-window request and failure counts are derived
    from the rate and the success ratio (rounded)."""
    rows: dict[str, dict[tuple[str, ...], dict[str, Any]]] = {s: {} for s in SCOPES}
    seen: set[int] = set(windows)  # a window without requests has no gauge
    overflowed: dict[str, int] = {}
    for family in text_string_to_metric_families(text):
        if not family.name.startswith(PREFIX + "_"):
            continue
        for sample in family.samples:
            if sample.name == f"{PREFIX}_label_overflow_total":
                overflowed[sample.labels["scope"]] = int(sample.value)
                continue
            scope, _, metric = sample.name[len(PREFIX) + 1 :].partition("_")
            if scope not in SCOPES or any(k not in sample.labels for k in SCOPES[scope]):
                continue
            key = tuple(sample.labels[k] for k in SCOPES[scope])
            row = rows[scope].setdefault(
                key,
                {
                    "labels": dict(zip(SCOPES[scope], key, strict=True)),
                    "total": 0,
                    "failures": 0,
                    "windows": {},
                },
            )
            if metric == "requests_total":
                row["total"] = int(sample.value)
            elif metric == "failures_total":
                row["failures"] = int(sample.value)
            elif "window" in sample.labels:
                w = sample.labels["window"]
                seen.add(int(w))
                stats = row["windows"].setdefault(w, {})
                if metric == "requests_per_second":
                    stats["rps"] = sample.value
                elif metric == "success_ratio":
                    stats["success"] = sample.value
                elif metric == "latency_seconds":
                    attr = dict(QUANTILES).get(sample.labels.get("quantile", ""))
                    if attr:
                        stats[attr] = sample.value * 1000
    return {
        "windows": sorted(seen),
        "overflowed": overflowed,
        "scopes": {
            scope: [_complete(row, sorted(seen)) for _, row in sorted(keyed.items())]
            for scope, keyed in rows.items()
        },
    }


def _complete(row: dict[str, Any], windows: list[int]) -> dict[str, Any]:
    for w in windows:
        stats = row["windows"].setdefault(str(w), {})
        requests = round(stats.get("rps", 0.0) * w)
        success = stats.get("success") if requests else None
        stats.update(
            requests=requests,
            rps=stats.get("rps", 0.0),
            success=success,
            failures=round(requests * (1 - success)) if success is not None else 0,
        )
        for _, attr in QUANTILES:
            stats.setdefault(attr, None)
    return row
