"""The prebound children of ``legation._prom`` expose exactly what the public methods do."""

from __future__ import annotations

import math
import threading
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from legation._prom import (
    FOLD_AT,
    BatchedCounter,
    BatchedHistogram,
    fold,
    incrementer,
    observer,
    queued,
)

BUCKETS = (0.0001, 0.00025, 0.001, 0.5, 1.0)
amounts = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=64),
    st.sampled_from([0.0, *BUCKETS, -0.0, 2.0, -1.0]),
)


def _pair() -> tuple[CollectorRegistry, Counter, Histogram]:
    registry = CollectorRegistry()
    counter = Counter("c", "c", ["l"], registry=registry)
    histogram = Histogram("h", "h", ["l"], buckets=BUCKETS, registry=registry)
    return registry, counter, histogram


def _exposition(registry: CollectorRegistry) -> list[str]:
    # _created samples carry the creation time, which differs between the two registries
    return [
        line for line in generate_latest(registry).decode().splitlines() if "_created" not in line
    ]


def _feed_both(values: list[float], public: tuple[Counter, Histogram], fast: Any) -> None:
    """Every value to ``public``'s metrics by their public methods and to ``fast``'s prebound
    (inc, observe); a negative counter amount is refused by both, at once."""
    counter, histogram = public
    inc, observe = fast
    for value in values:
        histogram.labels("a").observe(value)
        observe(value)
        if value >= 0 or math.isnan(value):
            counter.labels("a").inc(value)
            inc(value)
        else:
            with pytest.raises(ValueError, match="non-negative"):
                counter.labels("a").inc(value)
            with pytest.raises(ValueError, match="non-negative"):
                inc(value)  # for a batched counter: never queued


@settings(max_examples=200, deadline=None, database=None)
@given(st.lists(amounts, max_size=30))
def test_same_samples_as_the_public_methods(values: list[float]) -> None:
    public, c1, h1 = _pair()
    fast, c2, h2 = _pair()
    c1.labels("a"), h1.labels("a")  # both registries hold the children from the start
    inc, observe = incrementer(c2.labels("a")), observer(h2.labels("a"))
    assert inc is not c2.labels("a").inc and observe is not h2.labels("a").observe  # not a no-op
    _feed_both(values, (c1, h1), (inc, observe))
    assert _exposition(fast) == _exposition(public)


def test_a_child_it_does_not_know_gets_the_public_method() -> None:
    class Odd(Counter):
        def inc(self, amount: float = 1, exemplar: object = None) -> None:
            super().inc(amount * 2)

    registry = CollectorRegistry()
    odd = Odd("o", "o", ["l"], registry=registry)
    inc = incrementer(odd.labels("a"))
    inc(1)
    assert registry.get_sample_value("o_total", {"l": "a"}) == 2
    parent = Counter("p", "p", ["l"], registry=registry)
    with pytest.raises(ValueError, match="missing label values"):
        incrementer(parent)(1)  # the parent itself is not observable: the public error


def _batched_pair() -> tuple[CollectorRegistry, Counter, Histogram]:
    registry = CollectorRegistry()
    counter = BatchedCounter("c", "c", ["l"], registry=registry)
    histogram = BatchedHistogram("h", "h", ["l"], buckets=BUCKETS, registry=registry)
    return registry, counter, histogram


@settings(max_examples=200, deadline=None, database=None)
@given(st.lists(amounts, max_size=600))
def test_batched_metrics_expose_what_the_public_methods_do(values: list[float]) -> None:
    public, c1, h1 = _pair()
    batched, c2, h2 = _batched_pair()
    c1.labels("a"), h1.labels("a")
    # up to 600 updates: folds on the way (FOLD_AT) and at collection
    _feed_both(values, (c1, h1), (incrementer(c2.labels("a")), observer(h2.labels("a"))))
    assert _exposition(batched) == _exposition(public)


def test_batched_updates_wait_for_a_collection_or_a_full_queue() -> None:
    registry, counter, histogram = _batched_pair()
    inc, observe = incrementer(counter.labels("a")), observer(histogram.labels("a"))
    fold()
    inc(1)
    observe(0.0002)
    assert counter.labels("a")._value.get() == 0  # queued, not applied
    assert registry.get_sample_value("c_total", {"l": "a"}) == 1  # a collection folds first
    assert registry.get_sample_value("h_bucket", {"l": "a", "le": "0.00025"}) == 1
    for _ in range(FOLD_AT):
        inc(1)
    assert counter.labels("a")._value.get() >= FOLD_AT  # folded on the way, not only at scrape


def test_batched_updates_from_many_threads_are_all_counted() -> None:
    registry, counter, histogram = _batched_pair()
    inc, observe = incrementer(counter.labels("a")), observer(histogram.labels("a"))
    threads, each = 8, 5_000

    def work() -> None:
        for _ in range(each):
            inc(1)
            observe(0.5)

    pool = [threading.Thread(target=work) for _ in range(threads)]
    scraper_done = threading.Event()

    def scrape() -> None:  # collections folding concurrently with the writers
        while not scraper_done.is_set():
            generate_latest(registry)

    scraper = threading.Thread(target=scrape)
    scraper.start()
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    scraper_done.set()
    scraper.join()
    assert registry.get_sample_value("c_total", {"l": "a"}) == threads * each
    assert registry.get_sample_value("h_count", {"l": "a"}) == threads * each
    assert registry.get_sample_value("h_sum", {"l": "a"}) == threads * each * 0.5


def test_an_update_that_fails_in_a_fold_is_dropped_alone(caplog: pytest.LogCaptureFixture) -> None:
    """The fold runs in whichever request made the 256th update: a failing update must not fail
    that request nor stop the rest of the queue (attacker review)."""
    registry, counter, _ = _batched_pair()
    inc = incrementer(counter.labels("a"))

    def boom(amount: float) -> None:
        raise RuntimeError("boom")

    fold()
    queued(boom)(1)
    for _ in range(FOLD_AT):  # the fold happens during these, in this caller
        inc(1)
    assert registry.get_sample_value("c_total", {"l": "a"}) == FOLD_AT
    assert "a queued metric update failed" in caplog.text


# -- many amounts at once (what a fold does for a run of queued updates of one target) -------


@settings(max_examples=200, deadline=None, database=None)
@given(st.lists(amounts, max_size=60))
def test_many_at_once_exposes_what_one_by_one_does(values: list[float]) -> None:
    public, c1, h1 = _pair()
    fast, c2, h2 = _pair()
    c1.labels("a"), h1.labels("a")
    inc, observe = incrementer(c2.labels("a")), observer(h2.labels("a"))
    counted = [v for v in values if v >= 0 or math.isnan(v)]
    for value in values:
        h1.labels("a").observe(value)
    for value in counted:
        c1.labels("a").inc(value)
    observe.many(values)
    inc.many(counted)
    assert _exposition(fast) == _exposition(public)
    if len(counted) < len(values):  # a negative amount among many: refused, nothing added
        with pytest.raises(ValueError, match="non-negative"):
            inc.many(values)
        with pytest.raises(ValueError, match="non-negative"):
            inc.many([math.nan, *values])  # wherever a NaN stands (min() would miss it)
        assert _exposition(fast) == _exposition(public)


def test_a_fold_gives_a_run_of_one_update_its_amounts_at_once_in_order() -> None:
    fold()
    seen: list[list[float]] = []
    one: list[float] = []
    first, second = queued(one.append, seen.append), queued(one.append, seen.append)
    for amount in (1, 2, 3):
        first(amount)
    second(10)
    second(20)
    first(4)  # a run of one: called as it is
    fold()
    assert seen == [[1, 2, 3], [10, 20]] and one == [4]


@settings(max_examples=200, deadline=None, database=None)
@given(st.lists(st.tuples(st.booleans(), amounts), max_size=80))
@example(  # grouped per target, the sum came out one ulp away
    [
        (False, 0.004710966205396729),
        (True, 0.002476133049915897),
        (True, 0.002130680142311616),
        (False, 0.002738546099115437),
    ]
)
def test_updates_of_one_value_through_two_targets_keep_the_queue_order(
    steps: list[tuple[bool, float]],
) -> None:
    """Two queued targets observing into one histogram (ext_authz's latency per policy, for
    its allow and its deny updates): the floats as one-by-one updates in queue order leave
    them (an attacker's review found grouping per target reordered them)."""
    public, _, h1 = _pair()
    batched, _, h2 = _batched_pair()
    h1.labels("a")
    observe = observer(h2.labels("a"), direct=True)
    targets = [queued(observe, observe.many), queued(observe, observe.many)]
    fold()
    for which, value in steps:
        h1.labels("a").observe(value)
        targets[which](value)
    assert _exposition(batched) == _exposition(public)


def test_a_bad_amount_in_a_run_is_dropped_alone(caplog: pytest.LogCaptureFixture) -> None:
    """An amount that fails only when added (an int too large for a float) fails the run's
    ``many``, which changed nothing: the run is applied one by one, that amount dropped."""
    registry, counter, _ = _batched_pair()
    inc = incrementer(counter.labels("a"))
    fold()
    for amount in [1] * 10 + [10**400] + [1] * 5:
        inc(amount)
    assert registry.get_sample_value("c_total", {"l": "a"}) == 15
    assert "a queued metric update failed; dropped" in caplog.text


_REAP = """
import os, signal, time

def _reap(pid):  # the child's exit code; a child still hung after 10 s is killed (-9)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return -9
"""

_FORK_HOLDING = (
    _REAP
    + """
import os, threading
from prometheus_client import CollectorRegistry
from legation import _prom

counter = _prom.BatchedCounter("c", "c", ["l"], registry=CollectorRegistry())
inc = _prom.incrementer(counter.labels("a"))
value = counter.labels("a")._value
held, release = threading.Event(), threading.Event()

def holding():  # another thread inside the lock when the process forks
    with LOCK:
        held.set()
        release.wait()

threading.Thread(target=holding, daemon=True).start()
held.wait()
pid = os.fork()
if pid == 0:
    for _ in range(3):
        inc(1)
    _prom.fold()  # the lock the other thread held is not the child's
    os._exit(0 if value.get() == 3 else 1)
release.set()
print(_reap(pid))
"""
)


@pytest.mark.parametrize(
    "lock",
    ["_prom._fold_lock", "value._lock"],
    ids=["forked-during-a-fold", "forked-while-a-value-is-added-to"],
)
def test_a_forked_child_can_still_update_and_fold(lock: str) -> None:
    """Another thread holds a lock the fold needs (the fold's own, or a value's during a
    run's ``many``) when the process forks: the child must not inherit it held."""
    import subprocess
    import sys

    command = [sys.executable, "-c", _FORK_HOLDING.replace("LOCK", lock)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=30)
    assert done.stdout.strip() == "0", done.stderr
