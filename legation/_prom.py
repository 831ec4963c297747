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
are kept: ``deque.append`` and ``popleft`` are atomic and the fold holds a lock. The fold applies
each run of consecutive updates of one target at once (:class:`Update`'s ``many``): one lock
round trip per value and run, not per request; every amount is added in the order it was
queued, so the floats come out as one-by-one updates would leave them.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
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
_added: weakref.WeakSet[Any] = weakref.WeakSet()  # values _adder adds to (their locks)


def fold() -> None:
    """Apply every queued update, in the order queued (what a collection does first). A run of
    consecutive updates of one :class:`_Batched` target (the same request's metrics, over and
    over, under load) is applied by its ``many`` in one call: one lock round trip per value
    instead of one per request, the amounts added in the same order, so every float comes out
    as one-by-one updates leave it. An update that raises is logged and dropped alone (a run
    whose ``many`` raised, having changed nothing, is retried one by one): it must not fail the
    request or the scrape that happened to fold."""
    with _fold_lock:
        popleft = _pending.popleft
        target: Callable[[Any], None] | None = None
        run: list[Any] = []
        while _pending:
            apply, amount = popleft()
            if apply is target:
                run.append(amount)
                continue
            if target is not None:
                _apply(target, run)
            target, run = apply, [amount]
        if target is not None:
            _apply(target, run)


def _apply(target: Callable[[Any], None], amounts: list[Any]) -> None:
    if len(amounts) > 1 and type(target) is _Batched:
        try:
            target.many(amounts)
            return
        except Exception:  # nothing applied (see _Batched): one by one, the bad ones dropped
            pass
    for amount in amounts:
        try:
            target(amount)
        except Exception:
            log.exception("a queued metric update failed; dropped")


def _after_fork_in_child() -> None:
    """A forked child keeps its own updates only, with locks no other thread holds: the fold's,
    and those of the values a fold may have been adding to (:func:`_adder`)."""
    global _fold_lock
    _pending.clear()
    _fold_lock = threading.Lock()
    for value in list(_added):
        value._lock = threading.Lock()


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
    """``apply`` with its ``many`` (what :func:`fold` calls for a run of queued amounts).
    ``many(amounts)`` must do what ``apply`` of each amount in order would do, and change
    nothing when it raises (check and convert first): the fold then applies them one by one."""

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
    _added.add(value)

    def add_all(amounts: list[float]) -> None:
        with value._lock:  # read here: a forked child gets a new one (_after_fork_in_child)
            total = value._value
            for amount in amounts:
                total += amount  # raises before anything is stored (an int too large)
            value._value = total

    return add_all


def _each(update: Callable[[float], None]) -> Update:
    """``update`` with a ``many`` that calls it for each amount (a child this module does not
    know: its public method), each failure logged and dropped there (so that it never raises
    having changed something)."""

    def many(amounts: list[float]) -> None:
        for amount in amounts:
            try:
                update(amount)
            except Exception:
                log.exception("a metric update failed; dropped")

    return _Batched(update, many)  # type: ignore[return-value]


def incrementer(child: Any, *, direct: bool = False) -> Update:
    """``child.inc`` (a Counter's labelled child): adds a non-negative amount; queued for a
    :class:`BatchedCounter` unless ``direct`` (for use inside a :func:`queued` callable)."""
    value = getattr(child, "_value", None)
    value_inc = getattr(value, "inc", None)
    if value_inc is None or not _observable(child) or type(child).inc is not Counter.inc:
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
            for amount in [float(a) for a in amounts]:  # what could raise, before any change
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
        or type(child).observe is not Histogram.observe
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
            for at, n in counts.items():  # whole numbers: these cannot fail
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
