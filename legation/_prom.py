"""Prebound Prometheus children for the request path: the same samples, fewer Python steps.

``Counter.inc`` and ``Histogram.observe`` check on every call that the metric is a labelled
child (three Python frames) and a histogram walks its buckets in Python; the request-path
services call them a few times per request. :func:`incrementer` and :func:`observer` return,
once per label set, a callable that updates the same child's values directly (the checks done
once, here; the bucket found by bisection), so the exposition is exactly what the public methods
would produce (``tests/test_prom.py`` holds them together). Should prometheus_client's internals
not be what this module expects, they return the public methods: slower, never wrong.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable
from typing import Any


def incrementer(child: Any) -> Callable[[float], None]:
    """``child.inc`` (a Counter's labelled child): adds a non-negative amount."""
    value_inc = getattr(getattr(child, "_value", None), "inc", None)
    if value_inc is None or not _observable(child) or type(child).inc is not _counter_inc():
        return child.inc  # type: ignore[no-any-return]

    def inc(amount: float = 1) -> None:
        if amount < 0:
            raise ValueError("Counters can only be incremented by non-negative amounts.")
        value_inc(amount)

    return inc


def observer(child: Any) -> Callable[[float], None]:
    """``child.observe`` (a Histogram's labelled child)."""
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
        return child.observe  # type: ignore[no-any-return]
    bucket_incs = tuple(bucket.inc for bucket in buckets)
    public = child.observe

    def observe(amount: float) -> None:
        if amount != amount:  # NaN: no bucket holds it; the public method's own handling
            public(amount)
            return
        sum_inc(amount)
        bucket_incs[bisect_left(bounds, amount)](1)  # the first bound >= amount, as observe

    return observe


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
