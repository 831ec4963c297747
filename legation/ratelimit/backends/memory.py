"""The embedded default: counters in this process's memory (per process, so per worker).

Options:

* ``max_keys`` (default 1,000,000) and ``max_bytes`` (default 256 MiB): both bound the table.
  ``max_bytes`` is an estimate of what the table holds (each counter's key plus a fixed per-entry
  overhead measured on CPython), not the process's size.

Descriptor values come from request headers, so whoever sends requests chooses the keys. What
keeps the table bounded whatever they send:

* a key longer than :data:`MAX_KEY_CHARS` is stored as a 128-bit digest of itself, so a 1 MB
  header value costs what a short one does (two different long keys colliding would need a
  BLAKE2b collision);
* counters expire with their window (fixed window: window end + 1 s; sliding window: two windows;
  token bucket: until the bucket would be full again) and expired counters are dropped a few at a
  time on every hit, from an expiry-ordered index (one-second buckets), never by scanning;
* when a new counter would cross either bound, the least recently used counters are evicted first
  (the table is an LRU), one ``popitem`` each. Under a flood of distinct keys the flood's own
  one-hit counters are what gets evicted, while counters that are hit again stay: the cost is that
  an evicted counter starts again from zero (a limit can be exceeded by someone whose counter was
  evicted). That is the trade: bounded memory and O(1) work per hit beat exactness when the key
  cardinality is abusive; the service never grows without bound and never fails a hit for it.

Work per hit is O(1) amortised: at most :data:`SWEEP_BUDGET` expiry-index entries and as many LRU
evictions as the new counter needs room for. ``scanned`` counts every entry any of that work
touched (tests assert it does not grow with the table).
"""

from __future__ import annotations

import hashlib
import heapq
import sys
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from legation.errors import ConfigError
from legation.ratelimit import algorithms as alg
from legation.ratelimit.algorithms import Decision, Hit
from legation.ratelimit.config import Algorithm

MAX_KEY_CHARS = 256
"""Longer keys are replaced by a digest (a counter key is domain + descriptor entries + limit)."""
ENTRY_OVERHEAD = 400
"""Bytes one counter costs besides its key string: the state list and its ints, the LRU table's
slot and link, the expiry index's set slot (measured with tracemalloc: ~345 on CPython 3.11)."""
SWEEP_BUDGET = 32
"""Expiry-index entries examined per hit at most (expired counters are dropped incrementally)."""
_BUCKET_MS = 1000

# state list layout: [expires_ms, expiry bucket it is indexed under, a, b, c]
_EXP, _BKT = 0, 1


@dataclass(frozen=True, slots=True, kw_only=True)
class MemoryConfig:
    max_keys: int = 1_000_000
    max_bytes: int = 256 * 1024 * 1024


def _entry_bytes(key: str) -> int:
    return ENTRY_OVERHEAD + sys.getsizeof(key)


def store_key(key: str) -> str:
    """The key as stored: itself, or a fixed-size digest when it is long."""
    if len(key) <= MAX_KEY_CHARS:
        return key
    digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()
    return "#" + digest


class MemoryBackend:
    """Counters in an LRU table ``key -> [expires_ms, bucket, a, b, c]`` (a, b, c depend on the
    algorithm) with an expiry index ``bucket -> keys`` (a bucket is one second of expiry times)
    and a heap of the buckets in use."""

    def __init__(self, config: MemoryConfig | None = None) -> None:
        self._config = config or MemoryConfig()
        self._state: OrderedDict[str, list[int]] = OrderedDict()
        self._buckets: dict[int, set[str]] = {}
        self._heap: list[int] = []
        self.bytes = 0
        """Estimated bytes held by the table (see :data:`ENTRY_OVERHEAD`)."""
        self.evicted = 0
        """Counters dropped before they expired, to stay within the bounds."""
        self.scanned = 0
        """Entries touched by expiry and eviction work, ever (an operation count, for tests)."""

    def __len__(self) -> int:
        return len(self._state)

    async def hit(self, hits: Sequence[Hit], now_ms: int) -> list[Decision]:
        return [self.hit_one(h, now_ms) for h in hits]

    def hit_one(self, hit: Hit, now_ms: int) -> Decision:
        """Synchronous, atomic under the event loop (no await inside)."""
        limit, cost = hit.limit, hit.cost
        w = limit.window_ms
        base = hit.key if len(hit.key) <= MAX_KEY_CHARS else store_key(hit.key)
        if limit.algorithm is Algorithm.FIXED_WINDOW:
            return alg.fixed_window(limit, now_ms, cost, self.count_fixed(base, w, cost, now_ms))
        heap = self._heap
        if heap and (heap[0] + 1) * _BUCKET_MS <= now_ms:
            self._expire(now_ms)
        if limit.algorithm is Algorithm.SLIDING_WINDOW:
            start = alg.window_start(now_ms, w)
            state = self._get(base, now_ms)
            prev, cur = 0, 0
            if state is not None:  # [.., .., window start, count in that window, count before]
                if state[2] == start:
                    cur, prev = state[3], state[4]
                elif state[2] == start - w:
                    prev = state[3]
            allowed = alg.sliding_admits(limit, now_ms, cost, prev, cur)
            if allowed:
                cur += cost
                self._put(base, state, now_ms + 2 * w - (now_ms - start) + 1000, start, cur, prev)
            return alg.sliding_window(limit, now_ms, cost, prev, cur, allowed)
        state = self._get(base, now_ms)  # token bucket: [.., .., units, ts, 0]
        units, ts = alg.token_refill(
            limit, now_ms, state[2] if state else None, state[3] if state else now_ms
        )
        need = cost * w
        allowed = units >= need
        if allowed:
            units -= need
        decision = alg.token_bucket(limit, cost, units, allowed)
        if limit.requests_per_unit:
            self._put(base, state, now_ms + decision.reset_ms + 1000, units, ts, 0)
        return decision

    def count_fixed(self, base: str, window_ms: int, cost: int, now_ms: int) -> int:
        """Add ``cost`` to the fixed window of ``window_ms`` holding ``now_ms`` on the counter
        ``base`` (a key as :func:`store_key` leaves it); the window's count after. Synchronous,
        atomic under the event loop."""
        heap = self._heap
        if heap and (heap[0] + 1) * _BUCKET_MS <= now_ms:
            self._expire(now_ms)
        start = now_ms - now_ms % window_ms
        key = f"{base}:{start}"
        state = self._get(key, now_ms)
        if state is not None:
            state[2] += cost  # the same expiry (window end + 1 s): counted in place
            return state[2]
        self._insert(key, start + window_ms + 1000, cost, 0, 0)
        return cost

    async def close(self) -> None:
        self._state.clear()
        self._buckets.clear()
        self._heap.clear()
        self.bytes = 0

    # -- the table ---------------------------------------------------------------------------

    def _get(self, key: str, now_ms: int) -> list[int] | None:
        state = self._state.get(key)
        if state is None:
            return None
        if state[_EXP] <= now_ms:
            self._delete(key, state)
            return None
        self._state.move_to_end(key)
        return state

    def _put(self, key: str, state: list[int] | None, expires: int, a: int, b: int, c: int) -> None:
        """Update ``state`` (the live counter ``_get`` returned) in place, or insert a new one."""
        if state is None:
            self._insert(key, expires, a, b, c)
        else:  # its index entry stays; _expire re-indexes it when that bucket comes due
            state[0], state[2], state[3], state[4] = expires, a, b, c

    def _insert(self, key: str, expires: int, a: int, b: int, c: int) -> None:
        size = _entry_bytes(key)
        config = self._config
        while self._state and (
            len(self._state) >= config.max_keys or self.bytes + size > config.max_bytes
        ):
            old_key, old = self._state.popitem(last=False)  # least recently used
            self._unindex(old_key, old)
            self.bytes -= _entry_bytes(old_key)
            self.evicted += 1
            self.scanned += 1
        bucket = expires // _BUCKET_MS
        self._state[key] = [expires, bucket, a, b, c]
        self._index(key, bucket)
        self.bytes += size

    def _delete(self, key: str, state: list[int]) -> None:
        del self._state[key]
        self._unindex(key, state)
        self.bytes -= _entry_bytes(key)

    # -- the expiry index --------------------------------------------------------------------

    def _index(self, key: str, bucket: int) -> None:
        keys = self._buckets.get(bucket)
        if keys is None:
            keys = self._buckets[bucket] = set()
            heapq.heappush(self._heap, bucket)
        keys.add(key)

    def _unindex(self, key: str, state: list[int]) -> None:
        keys = self._buckets.get(state[_BKT])
        if keys is not None:
            keys.discard(key)
            if not keys:  # its heap entry stays until due (or until the heap is compacted)
                del self._buckets[state[_BKT]]
                if len(self._heap) > 2 * len(self._buckets) + 64:
                    self._heap = list(self._buckets)
                    heapq.heapify(self._heap)

    def _expire(self, now_ms: int) -> None:
        """Drop expired counters from due buckets, at most SWEEP_BUDGET entries per call; a
        counter whose expiry moved later since it was indexed is re-indexed under its expiry."""
        heap, buckets, table = self._heap, self._buckets, self._state
        budget = SWEEP_BUDGET
        while heap and (heap[0] + 1) * _BUCKET_MS <= now_ms and budget > 0:
            bucket = heap[0]
            keys = buckets.get(bucket)
            if keys is None:  # emptied by evictions
                heapq.heappop(heap)
                continue
            while keys and budget > 0:
                key = keys.pop()
                budget -= 1
                self.scanned += 1
                state = table[key]
                if state[_EXP] <= now_ms:
                    del table[key]
                    self.bytes -= _entry_bytes(key)
                else:
                    state[_BKT] = state[_EXP] // _BUCKET_MS
                    self._index(key, state[_BKT])
            if not keys:
                heapq.heappop(heap)
                del buckets[bucket]


def _positive_int(raw: Mapping[str, Any], name: str, default: int) -> int:
    value = raw.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(
            f"ratelimit backend memory: {name}: expected a positive integer, got {value!r}",
            code="invalid_type",
        )
    return value


class MemoryBackendFactory:
    name = "memory"

    def validate(self, raw: Mapping[str, Any]) -> MemoryConfig:
        unknown = set(raw) - {"max_keys", "max_bytes"}
        if unknown:
            raise ConfigError(
                f"ratelimit backend memory: unknown option {sorted(unknown)[0]!r}",
                code="unknown_key",
            )
        defaults = MemoryConfig()
        max_bytes = _positive_int(raw, "max_bytes", defaults.max_bytes)
        if max_bytes < 64 * 1024:
            raise ConfigError(
                f"ratelimit backend memory: max_bytes: expected at least 65536, got {max_bytes!r}",
                code="invalid_value",
            )
        return MemoryConfig(
            max_keys=_positive_int(raw, "max_keys", defaults.max_keys), max_bytes=max_bytes
        )

    def create(self, config: MemoryConfig) -> MemoryBackend:
        return MemoryBackend(config)
