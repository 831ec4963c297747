"""The memory rate-limit backend's table at its bound: the old full scan beside the LRU + expiry
index, side by side in one run.

    .venv/bin/python -m bench.ratelimit_memory [--hits 2000]

For each table size (1k, 5k, 50k counters = ``max_keys``) both stores are filled to the bound,
then timed on ``--hits`` hits:

* ``distinct``: every hit a new key (an attacker choosing descriptor values): each needs room;
* ``repeat``: the same 100 keys over and over (ordinary traffic once the table is full).

``scan`` is the pre-LRU algorithm, reimplemented here as the comparison row (it is no longer in
the package): a dict, and once ``max_keys`` is reached every hit sweeps the whole table for
expired counters and then drops the oldest-inserted ones. ``lru`` is
:class:`legation.ratelimit.backends.memory.MemoryBackend`. Both count fixed windows of one hour,
so nothing expires during the run and the bound is what is measured. Prints us/hit and the ratio.
"""

from __future__ import annotations

import argparse
import time

from legation.ratelimit import algorithms as alg
from legation.ratelimit.algorithms import Decision, Hit
from legation.ratelimit.backends.memory import MemoryBackend, MemoryConfig
from legation.ratelimit.config import Algorithm, Limit

T0 = 1_699_999_200_000
LIMIT = Limit(unit="hour", requests_per_unit=1_000_000, algorithm=Algorithm.FIXED_WINDOW)


class ScanBackend:
    """The old store's fixed-window path and its sweep, for comparison only."""

    def __init__(self, max_keys: int) -> None:
        self.max_keys = max_keys
        self.state: dict[str, list[int]] = {}
        self.next_sweep = 0

    def hit_one(self, hit: Hit, now_ms: int) -> Decision:
        if now_ms >= self.next_sweep or len(self.state) >= self.max_keys:
            self.sweep(now_ms)
        w = hit.limit.window_ms
        start = alg.window_start(now_ms, w)
        key = f"{hit.key}:{start}"
        state = self.state.get(key)
        if state is not None and state[0] > now_ms:
            state[1] += hit.cost
            count = state[1]
        else:
            count = hit.cost
            self.state[key] = [start + w + 1000, count, 0]
        return alg.fixed_window(hit.limit, now_ms, hit.cost, count)

    def sweep(self, now_ms: int) -> None:
        self.next_sweep = now_ms + 10_000
        for key in [k for k, v in self.state.items() if v[0] <= now_ms]:
            del self.state[key]
        excess = len(self.state) - self.max_keys + 1
        if excess > 0:
            for key in list(self.state)[:excess]:
                del self.state[key]


def us_per_hit(store: ScanBackend | MemoryBackend, hits: list[Hit]) -> float:
    start = time.perf_counter()
    for h in hits:
        store.hit_one(h, T0 + 1)
    return (time.perf_counter() - start) / len(hits) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hits", type=int, default=2000)
    args = parser.parse_args()
    print(f"{'keys':>7} {'traffic':>9} {'scan us/hit':>12} {'lru us/hit':>11} {'ratio':>8}")
    for size in (1_000, 5_000, 50_000):
        fill = [Hit(f"api|user=fill{i}", LIMIT, 1) for i in range(size)]
        stores: list[ScanBackend | MemoryBackend] = [
            ScanBackend(size),
            MemoryBackend(MemoryConfig(max_keys=size)),
        ]
        for store in stores:
            for h in fill:
                store.hit_one(h, T0)
        for traffic, hits in (
            ("distinct", [Hit(f"api|user=new{i}", LIMIT, 1) for i in range(args.hits)]),
            ("repeat", [Hit(f"api|user=hot{i % 100}", LIMIT, 1) for i in range(args.hits)]),
        ):
            # the scan row is O(table) per hit: fewer hits keep the run short, us/hit is the same
            scan_hits = hits[: max(50, args.hits * 1000 // size)]
            scan = us_per_hit(stores[0], scan_hits)
            lru = us_per_hit(stores[1], hits)
            print(f"{size:>7} {traffic:>9} {scan:>12.1f} {lru:>11.2f} {scan / lru:>7.0f}x")


if __name__ == "__main__":
    main()
