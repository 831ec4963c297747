"""Prebound Prometheus children for the request path: the same samples, fewer Python steps.

``Counter.inc`` and ``Histogram.observe`` check on every call that the metric is a labelled
child (three Python frames) and a histogram walks its buckets in Python; the request-path
services call them a few times per request. :func:`incrementer` and :func:`observer` return,
once per label set, a callable that updates the same child's values directly (the checks done
once, here; the bucket found by bisection), so the exposition is exactly what the public methods
would produce (``tests/test_prom.py`` holds them together). Should prometheus_client's internals
not be what this module expects, they return the public methods: slower, never wrong.

:class:`BatchedCounter` and :class:`BatchedHistogram` go one step further for the metrics a
request updates: their prebound callables only queue the update (one ``deque.append``), and
the queue is folded into the values in one tight loop every :data:`FOLD_AT` updates and before
any collection (a scrape, ``get_sample_value``), so what is exposed is exact. Under load the
handler's cache-cold Python is what costs: three lock round trips and a bucket search per
request were about 5 us of an ext_authz call's 28 us (bench/README). Updates from any thread
are kept: ``deque.append`` and ``popleft`` are atomic and the fold holds a lock. The fold groups
the queue by what each update changes and applies each group at once (:class:`Update`'s
``many``): one lock round trip per value and fold, not per request; amounts are added in the
order they were queued, so the floats come out as one-by-one updates would leave them.
"""

from __future__ import annotations

import logging
import os
import threading
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, Protocol, TypeVar

from prometheus_client import Counter, Histogram
from prometheus_client.metrics_core import Metric
from prometheus_client.values import MutexValue

log = logging.getLogger("legation.metrics")

_T = TypeVar("_T")
FOLD_AT = 256
_pending: deque[tuple[Callable[[Any], None], Any]] = deque()
_fold_lock = threading.Lock()


def fold() -> None:
    """Apply every queued update (what a collection does first), grouped by what they update:
    an update with a ``many`` (:class:`Update`) gets all its queued amounts in one call (one
    lock round trip per value instead of one per request), in the order they were queued. An
    update that raises is logged and dropped (with the others of its group, when it takes them
    at once): it must not fail the request or the scrape that happened to fold."""
    with _fold_lock:
        popleft = _pending.popleft
        groups: dict[Callable[[Any], None], list[Any]] = {}
        while _pending:
            apply, amount = popleft()
            amounts = groups.get(apply)
            if amounts is None:
                groups[apply] = [amount]
            else:
                amounts.append(amount)
        for apply, amounts in groups.items():
            many = getattr(apply, "many", None)
            if many is not None:
                try:
                    many(amounts)
                except Exception:
                    log.exception("%d queued metric updates failed; dropped", len(amounts))
                continue
            for amount in amounts:
                try:
                    apply(amount)
                except Exception:
                    log.exception("a queued metric update failed; dropped")


def _after_fork_in_child() -> None:
    """A forked child keeps its own updates only, with a lock no other thread holds."""
    global _fold_lock
    _pending.clear()
    _fold_lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


class BatchedCounter(Counter):
    """A Counter whose prebound children (:func:`incrementer`) queue their updates."""

    def collect(self) -> Iterable[Metric]:
        fold()
        return super().collect()


class BatchedHistogram(Histogram):
    """A Histogram whose prebound children (:func:`observer`) queue their updates."""

    def collect(self) -> Iterable[Metric]:
        fold()
        return super().collect()


class Update(Protocol):
    """A prebound update: ``update(amount)``, or ``update.many(amounts)`` for several at once
    (the same result as calling it for each, in order)."""

    def __call__(self, amount: float = 1, /) -> None: ...

    def many(self, amounts: list[float], /) -> None: ...


class _Batched:
    """``apply`` with its ``many`` (what :func:`fold` calls for a group of queued amounts)."""

    __slots__ = ("__call__", "many")

    def __init__(self, apply: Callable[[Any], None], many: Callable[[list[Any]], None]) -> None:
        self.__call__ = apply
        self.many = many


def queued(
    apply: Callable[[_T], None], many: Callable[[list[_T]], None] | None = None
) -> Callable[[_T], None]:
    """``apply`` deferred: the returned callable queues its argument for the next fold. For
    one update that moves several batched children at once (``direct`` children, whose
    ``many`` let ``many`` here apply a whole fold's amounts at once)."""
    append = _pending.append
    target: Callable[[_T], None] = apply if many is None else _Batched(apply, many)

    def queue(amount: _T) -> None:
        append((target, amount))
        if len(_pending) >= FOLD_AT:
            fold()

    return queue


def _adder(value: Any) -> Callable[[list[float]], None] | None:
    """Add amounts to a prometheus_client ``MutexValue`` under one lock round trip, in order
    (the float result of adding them one by one); None for any other kind of value."""
    if type(value) is not MutexValue or not hasattr(value, "_lock"):
        return None
    lock = value._lock

    def add_all(amounts: list[float]) -> None:
        with lock:
            total = value._value
            for amount in amounts:
                total += amount
            value._value = total

    return add_all


def _each(update: Callable[[float], None]) -> Update:
    """``update`` with a ``many`` that calls it for each amount (a child this module does not
    know: its public method)."""

    def many(amounts: list[float]) -> None:
        for amount in amounts:
            update(amount)

    return _Batched(update, many)  # type: ignore[return-value]


def incrementer(child: Any, *, direct: bool = False) -> Update:
    """``child.inc`` (a Counter's labelled child): adds a non-negative amount; queued for a
    :class:`BatchedCounter` unless ``direct`` (for use inside a :func:`queued` callable)."""
    value = getattr(child, "_value", None)
    value_inc = getattr(value, "inc", None)
    if value_inc is None or not _observable(child) or type(child).inc is not _counter_inc():
        return _each(child.inc)
    add_all = _adder(value)
    added = value_inc if add_all is None else _Batched(value_inc, add_all)

    if isinstance(child, BatchedCounter) and not direct:
        append = _pending.append

        def queued_inc(amount: float = 1) -> None:  # queued(value_inc), one call fewer
            if amount < 0:
                raise ValueError("Counters can only be incremented by non-negative amounts.")
            append((added, amount))
            if len(_pending) >= FOLD_AT:
                fold()

        return _each(queued_inc)

    def inc(amount: float = 1) -> None:
        if amount < 0:
            raise ValueError("Counters can only be incremented by non-negative amounts.")
        value_inc(amount)

    def inc_many(amounts: list[float]) -> None:
        if any(amount < 0 for amount in amounts):  # (min() of a list with a NaN may be NaN)
            raise ValueError("Counters can only be incremented by non-negative amounts.")
        if add_all is None:
            for amount in amounts:
                value_inc(amount)
        else:
            add_all(amounts)

    return _Batched(inc, inc_many)  # type: ignore[return-value]


def observer(child: Any, *, direct: bool = False) -> Update:
    """``child.observe`` (a Histogram's labelled child); queued for a
    :class:`BatchedHistogram` unless ``direct``."""
    bounds = getattr(child, "_upper_bounds", None)
    buckets = getattr(child, "_buckets", None)
    sum_inc = getattr(getattr(child, "_sum", None), "inc", None)
    if (
        sum_inc is None
        or not isinstance(bounds, list)
        or not isinstance(buckets, list)
        or len(bounds) != len(buckets)
        or not bounds
        or bounds[-1] != float("inf")
        or not _observable(child)
        or type(child).observe is not _histogram_observe()
    ):
        return _each(child.observe)
    bucket_incs = tuple(bucket.inc for bucket in buckets)
    public = child.observe

    def observe(amount: float) -> None:
        if amount != amount:  # NaN: no bucket holds it; the public method's own handling
            public(amount)
            return
        sum_inc(amount)
        bucket_incs[bisect_left(bounds, amount)](1)  # the first bound >= amount, as observe

    add_sum = _adder(child._sum)
    bucket_adds = [_adder(bucket) for bucket in buckets]
    if add_sum is None or None in bucket_adds:
        batched = _each(observe)
    else:

        def observe_many(amounts: list[float]) -> None:
            counts: dict[int, int] = {}
            for amount in amounts:
                if amount == amount:
                    at = bisect_left(bounds, amount)
                    counts[at] = counts.get(at, 0) + 1
            add_sum(amounts)  # a NaN makes the sum NaN, as the public method's would
            for at, n in counts.items():
                bucket_adds[at]([n])  # type: ignore[misc]

        batched = _Batched(observe, observe_many)  # type: ignore[assignment]
    if isinstance(child, BatchedHistogram) and not direct:
        return _each(queued(batched))
    return batched


def _observable(child: Any) -> bool:
    try:
        return bool(child._is_observable())
    except Exception:
        return False


def _counter_inc() -> Any:
    from prometheus_client import Counter

    return Counter.inc


def _histogram_observe() -> Any:
    from prometheus_client import Histogram

    return Histogram.observe
