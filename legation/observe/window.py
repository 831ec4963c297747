"""A sliding window of request outcomes in fixed memory: one-second slots of a bucketed histogram.

A :class:`SlidingWindow` keeps :data:`HORIZON_S` one-second slots in a ring. Each slot holds the
second it belongs to, its request count, its failures and a latency histogram over the fixed
bounds :data:`BOUNDS_MS`; a slot is cleared when the ring comes round to it again. So a key costs
``HORIZON_S x (len(BOUNDS_MS) + 3)`` integers however many requests it sees, and any window up to
the horizon is a sum of slots. Percentiles are read off the summed histogram, interpolated
linearly inside the bucket the rank falls in: accurate to the bucket, never beyond it.
"""

from __future__ import annotations

import math
from array import array
from bisect import bisect_left
from dataclasses import dataclass

__all__ = ["BOUNDS_MS", "HORIZON_S", "SlidingWindow", "WindowStats", "bucket_of"]

HORIZON_S = 60
"""The longest window (seconds) any key can answer for."""

BOUNDS_MS: tuple[float, ...] = (
    1,
    2,
    3,
    5,
    7.5,
    10,
    15,
    20,
    30,
    50,
    75,
    100,
    150,
    200,
    300,
    500,
    750,
    1_000,
    1_500,
    2_000,
    3_000,
    5_000,
    10_000,
    30_000,
    60_000,
)
"""Upper bounds (inclusive, milliseconds) of the latency buckets; one more bucket holds the rest."""

_NB = len(BOUNDS_MS) + 1


def bucket_of(ms: float) -> int:
    """The bucket holding a latency of ``ms``: bucket i is (BOUNDS[i-1], BOUNDS[i]]."""
    return bisect_left(BOUNDS_MS, ms)


@dataclass(frozen=True, slots=True)
class WindowStats:
    """One key over one window: ``rps`` is requests / window seconds; ``success`` the share of
    answers that were not 5xx (None without requests); latencies in milliseconds (None without
    requests; ``inf`` when the rank falls past the last bound)."""

    requests: int
    failures: int
    seconds: int
    p50_ms: float | None
    p90_ms: float | None
    p99_ms: float | None

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    @property
    def success(self) -> float | None:
        return None if not self.requests else (self.requests - self.failures) / self.requests


class SlidingWindow:
    """Counts, failures and a latency histogram for the last :data:`HORIZON_S` seconds, plus
    totals since the key was created (for Prometheus counters)."""

    __slots__ = ("_counts", "_fails", "_hist", "_sec", "last_second", "total", "total_failures")

    def __init__(self) -> None:
        self._sec = array("q", [-1] * HORIZON_S)
        self._counts = array("Q", [0] * HORIZON_S)
        self._fails = array("Q", [0] * HORIZON_S)
        self._hist = array("Q", [0] * (HORIZON_S * _NB))
        self.total = 0
        self.total_failures = 0
        self.last_second = -1

    def record(self, second: int, ms: float, failed: bool) -> None:
        """One request that ended in ``second`` (whole seconds of a monotonic or wall clock)."""
        i = second % HORIZON_S
        if self._sec[i] != second:
            self._sec[i] = second
            self._counts[i] = 0
            self._fails[i] = 0
            base = i * _NB
            for b in range(base, base + _NB):
                self._hist[b] = 0
        self._counts[i] += 1
        self._hist[i * _NB + bucket_of(ms)] += 1
        self.total += 1
        if failed:
            self._fails[i] += 1
            self.total_failures += 1
        self.last_second = max(self.last_second, second)

    def stats(self, now_second: int, seconds: int) -> WindowStats:
        """The window of ``seconds`` ending with ``now_second`` (included, though running)."""
        return self.stats_for(now_second, (seconds,))[seconds]

    def stats_for(self, now_second: int, windows: tuple[int, ...]) -> dict[int, WindowStats]:
        """Several windows ending with ``now_second``, in one pass over the slots."""
        for w in windows:
            if not 0 < w <= HORIZON_S:
                raise ValueError(f"a window is 1..{HORIZON_S} s, not {w}")
        hists = {w: [0] * _NB for w in windows}
        counts = dict.fromkeys(windows, 0)
        fails = dict.fromkeys(windows, 0)
        for i in range(HORIZON_S):
            age = now_second - self._sec[i]
            if not 0 <= age < HORIZON_S or not self._counts[i]:
                continue
            slot = self._hist[i * _NB : (i + 1) * _NB]
            for w in windows:
                if age < w:
                    counts[w] += self._counts[i]
                    fails[w] += self._fails[i]
                    hists[w] = [a + b for a, b in zip(hists[w], slot, strict=True)]
        return {
            w: WindowStats(
                requests=counts[w],
                failures=fails[w],
                seconds=w,
                p50_ms=_quantile(hists[w], counts[w], 0.50),
                p90_ms=_quantile(hists[w], counts[w], 0.90),
                p99_ms=_quantile(hists[w], counts[w], 0.99),
            )
            for w in windows
        }


def _quantile(hist: list[int], count: int, q: float) -> float | None:
    if not count:
        return None
    rank = q * count
    seen = 0
    for b, n in enumerate(hist):
        if n and seen + n >= rank:
            if b == len(BOUNDS_MS):
                return math.inf
            low = BOUNDS_MS[b - 1] if b else 0.0
            return low + (BOUNDS_MS[b] - low) * (rank - seen) / n
        seen += n
    return math.inf
