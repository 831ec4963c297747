"""Prometheus metrics of the ext_proc service: streams, phases, filter latency and errors.

Pass your own ``CollectorRegistry`` (tests do); label children are cached so a phase costs a dict
lookup, not a ``labels()`` call, and the per-message ones are prebound (:mod:`legation._prom`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter

from legation._prom import BatchedCounter, BatchedHistogram, incrementer, observer, queued

_LATENCY_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25, 1.0)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        reg = registry if registry is not None else REGISTRY
        self.streams = BatchedCounter(
            "legation_extproc_streams",
            "ext_proc streams (one per HTTP request)",
            ["chain"],
            registry=reg,
        )
        self.phases = BatchedCounter(
            "legation_extproc_phases",
            "Messages processed, by phase",
            ["chain", "phase"],
            registry=reg,
        )
        self.filter_seconds = BatchedHistogram(
            "legation_extproc_filter_seconds",
            "Time spent in a filter hook",
            ["filter", "phase"],
            buckets=_LATENCY_BUCKETS,
            registry=reg,
        )
        self.errors = Counter(
            "legation_extproc_errors",
            "Errors by filter and code (filter is '-' for stream-level errors)",
            ["filter", "code"],
            registry=reg,
        )
        self.immediate = Counter(
            "legation_extproc_immediate_responses",
            "Answers sent without reaching the upstream",
            ["chain", "status"],
            registry=reg,
        )
        self._cache: dict[tuple[str, ...], Any] = {}
        # the per-message ones, prebound (legation._prom): chains, filters and phases are few
        self._streams: dict[str, Callable[[float], None]] = {}
        self._recorders: dict[tuple[str, str, tuple[str, ...]], Any] = {}

    def stream(self, chain: str) -> None:
        inc = self._streams.get(chain)
        if inc is None:
            inc = self._streams[chain] = incrementer(self.streams.labels(chain))
        inc(1)

    def recorder(
        self, chain: str, phase: str, filters: Sequence[str]
    ) -> Callable[[tuple[Sequence[float], bool]], None]:
        """What one message of ``phase`` through ``chain``'s ``filters`` updates, as one queued
        update (legation._prom) of ``(durations, opened)``: the stream counted when the message
        opened it, the phase counted, and each filter's time observed (the durations of the
        filters that ran, in order; fewer when one failed or answered)."""
        key = (chain, phase, tuple(filters))
        found = self._recorders.get(key)
        if found is None:
            streams = incrementer(self.streams.labels(chain), direct=True)
            count = incrementer(self.phases.labels(chain, phase), direct=True)
            observers = tuple(
                observer(self.filter_seconds.labels(name, phase), direct=True) for name in filters
            )

            def record(entry: tuple[Sequence[float], bool]) -> None:
                durations, opened = entry
                if opened:
                    streams(1)
                count(1)
                for observe, seconds in zip(observers, durations, strict=False):
                    observe(seconds)

            def record_many(batch: list[tuple[Sequence[float], bool]]) -> None:
                times = [  # each filter's, converted before any change (only that could raise)
                    [float(d[at]) for d, _ in batch if len(d) > at] for at in range(len(observers))
                ]
                for observe, seconds in zip(observers, times, strict=True):
                    if seconds:
                        observe.many(seconds)
                opened = sum(1 for _, o in batch if o)
                if opened:
                    streams(opened)
                count(len(batch))

            found = queued(record, record_many)
            if len(self._recorders) < 10_000:  # chains x phases: bounded by the config
                self._recorders[key] = found
        return found

    def error(self, filter_name: str, code: str) -> None:
        self._child(self.errors, "e", filter_name, code).inc()

    def answered(self, chain: str, status: int) -> None:
        self._child(self.immediate, "i", chain, str(status)).inc()

    def _child(self, metric: Any, tag: str, *labels: str) -> Any:
        key = (tag, *labels)
        child = self._cache.get(key)
        if child is None:
            child = self._cache[key] = metric.labels(*labels)
        return child
