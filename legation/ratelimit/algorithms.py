"""The counting rules, in integer milliseconds, shared by every backend.

Each algorithm is split into a *state step* (what the store does atomically: the memory backend runs
the Python functions below, Redis runs the same arithmetic in :mod:`._lua`) and a *decision* built
from the step's result (:func:`fixed_window`, :func:`sliding_window`, :func:`token_bucket`), so both
backends answer identically and one set of edge tests covers the rules.

* fixed window (envoyproxy/ratelimit's): a counter per ``[start, start + unit)`` aligned to the
  epoch; every hit is counted, a hit is over the limit when the counter after it exceeds the limit.
* sliding window (counter approximation): the previous window's count, weighted by how much of it
  still overlaps the sliding window, plus the current count; only admitted hits are counted.
* token bucket: ``requests_per_unit`` tokens of capacity, refilled continuously at
  ``requests_per_unit`` per unit; a hit takes ``cost`` tokens or is refused without taking any.
  Tokens are kept in units of 1/window_ms of a token so the refill is exact integer arithmetic.

Times are integer milliseconds from an injectable clock; nothing here reads the time.
"""

from __future__ import annotations

from dataclasses import dataclass

from legation.ratelimit.config import Algorithm, Limit


@dataclass(frozen=True, slots=True)
class Hit:
    """One limit to count for one request descriptor. ``key`` identifies the counter (without the
    window); ``cost`` is the request's hits_addend."""

    key: str
    limit: Limit
    cost: int


@dataclass(frozen=True, slots=True)
class Decision:
    """``remaining`` after this hit; ``reset_ms`` until the limit resets (window end, or bucket
    full); ``retry_ms``: when refused, the earliest the same hit could pass (the over-limit
    cache's TTL); ``used``: the counter after this hit where the algorithm counts every hit
    (fixed window), else the admitted usage, or -1 when unknown (the hit was refused without being
    counted, or answered from an over-limit cache): the near/over-limit split needs it."""

    allowed: bool
    remaining: int
    reset_ms: int
    retry_ms: int = 0
    used: int = -1


def window_start(now_ms: int, window_ms: int) -> int:
    return now_ms - now_ms % window_ms


# -- fixed window ---------------------------------------------------------------------------------


def fixed_window(limit: Limit, now_ms: int, cost: int, count_after: int) -> Decision:
    """Decision once the window's counter has been incremented by ``cost`` to ``count_after``."""
    w = limit.window_ms
    reset = window_start(now_ms, w) + w - now_ms
    allowed = count_after <= limit.requests_per_unit
    remaining = max(0, limit.requests_per_unit - count_after)
    return Decision(allowed, remaining, reset, 0 if allowed else reset, count_after)


# -- sliding window -------------------------------------------------------------------------------


def sliding_admits(limit: Limit, now_ms: int, cost: int, prev: int, cur: int) -> bool:
    w = limit.window_ms
    elapsed = now_ms - window_start(now_ms, w)
    return prev * (w - elapsed) + (cur + cost) * w <= limit.requests_per_unit * w


def sliding_window(
    limit: Limit, now_ms: int, cost: int, prev: int, cur_after: int, allowed: bool
) -> Decision:
    """Decision from the previous window's count and the current one after the step."""
    w = limit.window_ms
    rpu = limit.requests_per_unit
    elapsed = now_ms - window_start(now_ms, w)
    reset = w - elapsed
    used = prev * (w - elapsed) + cur_after * w  # in 1/w requests
    remaining = max(0, (rpu * w - used) // w)
    if allowed:
        return Decision(True, remaining, reset, used=rpu - remaining)
    if cur_after + cost > rpu or prev == 0:
        retry = reset  # not before this window ends, maybe later: the cache re-asks then
    else:
        # the previous window's weight must fall until the hit fits: prev*(w-elapsed-t) <= room
        room = (rpu - cur_after - cost) * w
        retry = max(1, (w - elapsed) - room // prev)
    return Decision(False, remaining, reset, min(retry, reset))


# -- token bucket ---------------------------------------------------------------------------------


def token_refill(limit: Limit, now_ms: int, units: int | None, ts: int) -> tuple[int, int]:
    """Tokens (in 1/window_ms units) and timestamp after refilling up to ``now_ms``."""
    capacity = limit.requests_per_unit * limit.window_ms
    if units is None:
        return capacity, now_ms
    if now_ms > ts:
        return min(capacity, units + (now_ms - ts) * limit.requests_per_unit), now_ms
    return units, ts


def token_bucket(limit: Limit, cost: int, units_after: int, allowed: bool) -> Decision:
    """Decision from the bucket's content after the step."""
    w = limit.window_ms
    rpu = limit.requests_per_unit
    remaining = units_after // w
    if rpu == 0:
        return Decision(allowed, 0, w, 0 if allowed else w)
    reset = -(-(rpu * w - units_after) // rpu)  # until full, rounded up
    if allowed:
        return Decision(True, remaining, reset, used=rpu - remaining)
    if cost > rpu:
        return Decision(False, remaining, reset, w)  # can never fit; ask again each window
    retry = -(-(cost * w - units_after) // rpu)
    return Decision(False, remaining, reset, max(1, retry))


def ttl_ms(limit: Limit) -> int:
    """How long a counter must outlive its last write (plus a second of slack)."""
    w = limit.window_ms
    return (2 * w if limit.algorithm is Algorithm.SLIDING_WINDOW else w) + 1000
