"""The embedded default: counters in this process's memory (per process, so per worker).

Options: ``max_keys`` (default 1,000,000): past it, expired counters are swept and, if that is not
enough, the oldest-inserted counters are dropped (a bounded memory footprint beats exactness for
abusive key cardinality).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from legation.errors import ConfigError
from legation.ratelimit import algorithms as alg
from legation.ratelimit.algorithms import Decision, Hit
from legation.ratelimit.config import Algorithm


@dataclass(frozen=True, slots=True, kw_only=True)
class MemoryConfig:
    max_keys: int = 1_000_000


class MemoryBackend:
    """Counters in a dict: ``key -> [expires_ms, a, b]`` (a, b depend on the algorithm)."""

    def __init__(self, config: MemoryConfig | None = None) -> None:
        self._config = config or MemoryConfig()
        self._state: dict[str, list[int]] = {}
        self._next_sweep = 0

    def __len__(self) -> int:
        return len(self._state)

    async def hit(self, hits: Sequence[Hit], now_ms: int) -> list[Decision]:
        return [self.hit_one(h, now_ms) for h in hits]

    def hit_one(self, hit: Hit, now_ms: int) -> Decision:
        """Synchronous, atomic under the event loop (no await inside)."""
        if now_ms >= self._next_sweep or len(self._state) >= self._config.max_keys:
            self._sweep(now_ms)
        limit, cost = hit.limit, hit.cost
        w = limit.window_ms
        if limit.algorithm is Algorithm.FIXED_WINDOW:
            start = alg.window_start(now_ms, w)
            key = f"{hit.key}:{start}"
            state = self._state.get(key)
            if state is not None and state[0] > now_ms:
                state[1] += cost  # the same expiry (window end + 1 s): counted in place
                count = state[1]
            else:
                count = cost
                self._state[key] = [start + w + 1000, count, 0]
            return alg.fixed_window(limit, now_ms, cost, count)
        if limit.algorithm is Algorithm.SLIDING_WINDOW:
            start = alg.window_start(now_ms, w)
            state = self._get(hit.key, now_ms)
            prev, cur = 0, 0
            if state is not None:  # [expires, window start, count in that window, count before]
                if state[1] == start:
                    cur, prev = state[2], state[3]
                elif state[1] == start - w:
                    prev = state[2]
            allowed = alg.sliding_admits(limit, now_ms, cost, prev, cur)
            if allowed:
                cur += cost
                self._put(hit.key, now_ms, 2 * w - (now_ms - start) + 1000, start, cur, prev)
            return alg.sliding_window(limit, now_ms, cost, prev, cur, allowed)
        state = self._get(hit.key, now_ms)  # token bucket: [expires, units, ts]
        units, ts = alg.token_refill(limit, now_ms, state[1] if state else None,
                                     state[2] if state else now_ms)
        need = cost * w
        allowed = units >= need
        if allowed:
            units -= need
        decision = alg.token_bucket(limit, cost, units, allowed)
        if limit.requests_per_unit:
            self._put(hit.key, now_ms, decision.reset_ms + 1000, units, ts)
        return decision

    async def close(self) -> None:
        self._state.clear()

    def _get(self, key: str, now_ms: int) -> list[int] | None:
        state = self._state.get(key)
        if state is not None and state[0] <= now_ms:
            del self._state[key]
            return None
        return state

    def _put(self, key: str, now_ms: int, ttl: int, *values: int) -> None:
        self._state[key] = [now_ms + ttl, *values]

    def _sweep(self, now_ms: int) -> None:
        self._next_sweep = now_ms + 10_000
        for key in [k for k, v in self._state.items() if v[0] <= now_ms]:
            del self._state[key]
        excess = len(self._state) - self._config.max_keys + 1
        if excess > 0:
            for key in list(self._state)[:excess]:
                del self._state[key]


class MemoryBackendFactory:
    name = "memory"

    def validate(self, raw: Mapping[str, Any]) -> MemoryConfig:
        unknown = set(raw) - {"max_keys"}
        if unknown:
            raise ConfigError(f"ratelimit backend memory: unknown option {sorted(unknown)[0]!r}",
                              code="unknown_key")
        max_keys = raw.get("max_keys", 1_000_000)
        if isinstance(max_keys, bool) or not isinstance(max_keys, int) or max_keys < 1:
            raise ConfigError(f"ratelimit backend memory: max_keys: expected a positive integer, "
                              f"got {max_keys!r}", code="invalid_type")
        return MemoryConfig(max_keys=max_keys)

    def create(self, config: MemoryConfig) -> MemoryBackend:
        return MemoryBackend(config)
