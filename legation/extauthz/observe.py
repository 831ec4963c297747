"""Metrics (prometheus_client, on a registry the caller passes) and the JSON-lines decision log.

The decision log never sees a token: it records the path without its query string, the policy,
the checks, the result and the latency, and nothing from headers or cookies.

The ``policy`` label is bounded: the policy name comes from the route's ``context_extensions``,
which any client of the gRPC port chooses, so a series per name would grow without end. A name
gets its own series when the service knows it (``default_policy``, ``dry_run``, a check's
``default_policy``, the packages a policy check has loaded, see :class:`PolicyLabels`), and the
first ``spare_policy_labels`` (32) other names get one too (routes whose policy is only a label,
e.g. a JWT-only route); every later unknown name is counted under ``policy="other"``.

Both sit on the request path: metric children are looked up once per label set, and the log is
written through a buffer flushed in the background (at most ``flush_interval_s`` behind, and on
close), not flushed per line.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.core import CounterMetricFamily
from prometheus_client.metrics_core import Metric

from legation._prom import BatchedCounter, BatchedHistogram, incrementer, observer, queued
from legation.tracing.spans import CallTracer, SpanContext

decision_logger = logging.getLogger("legation.extauthz.decisions")

_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


OTHER_POLICY = "other"


class PolicyLabels:
    """Policy name -> ``policy`` label, from a bounded set (see the module docstring).

    ``known`` are fixed names; each of ``catalogs`` returns the names a check knows right now
    (it may change on a policy reload), and is asked only for names not seen before."""

    def __init__(
        self,
        known: Iterable[str] = (),
        catalogs: Iterable[Callable[[], Collection[str]]] = (),
        *,
        spare: int = 32,
    ) -> None:
        self._known = frozenset(known) | {OTHER_POLICY}
        self._catalogs = tuple(catalogs)
        self._spare = spare
        self._labels: dict[str, str] = {}  # name -> its own label; bounded below
        self._spare_used = 0

    def __call__(self, policy: str) -> str:
        label = self._labels.get(policy)
        if label is not None:
            return label
        if policy in self._known or self._in_catalog(policy):
            label = policy
        elif self._spare_used < self._spare:
            self._spare_used += 1
            label = policy
        else:
            return OTHER_POLICY  # not remembered: the map stays bounded too
        if len(self._labels) < 4096:
            self._labels[policy] = label
        return label

    def _in_catalog(self, policy: str) -> bool:
        for catalog in self._catalogs:
            try:
                if policy in catalog():
                    return True
            except Exception:  # a catalog must never break a decision
                continue
        return False


def service_policy_labels(config: Any, checks: Mapping[str, object]) -> PolicyLabels:
    """The :class:`PolicyLabels` of a service: the names its config and its checks know.

    A check that knows policies by name implements :class:`~legation.extauthz.checks.
    PolicyCatalog` (``policy_names()``); a check with a policy store whose running version lists
    ``packages`` is read the same way until it does."""
    known = {"-", *(getattr(config, "dry_run", ()) or ())}
    if getattr(config, "default_policy", None):
        known.add(config.default_policy)
    catalogs: list[Callable[[], Collection[str]]] = []
    for check in checks.values():
        default = getattr(getattr(check, "config", None), "default_policy", None)
        if isinstance(default, str) and default:
            known.add(default)
        names = getattr(check, "policy_names", None)
        if callable(names):
            catalogs.append(names)
        elif getattr(check, "store", None) is not None:
            catalogs.append(_store_packages(check.store))  # type: ignore[attr-defined]
    return PolicyLabels(known, catalogs)


def _store_packages(store: Any) -> Callable[[], Collection[str]]:
    def packages() -> Collection[str]:
        found = getattr(store.current, "packages", ())
        return found if isinstance(found, Collection) else ()

    return packages


class Metrics:
    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        policy_labels: PolicyLabels | None = None,
    ) -> None:
        registry = registry if registry is not None else REGISTRY
        self.decisions = BatchedCounter(
            "legation_extauthz_decisions",
            "ext_authz decisions by policy and result",
            ["policy", "result"],
            registry=registry,
        )
        self.errors = BatchedCounter(
            "legation_extauthz_check_errors",
            "checks that errored or timed out, by code",
            ["policy", "code"],
            registry=registry,
        )
        self.latency = BatchedHistogram(
            "legation_extauthz_handler_seconds",
            "time spent in the Check handler",
            ["policy"],
            buckets=_BUCKETS,
            registry=registry,
        )

        self._children: dict[tuple[str, str, str], Callable[[float], None]] = {}
        self._registry = registry
        self.policy_label = policy_labels or PolicyLabels()

    def bound_policies(self, labels: PolicyLabels) -> None:
        """Use ``labels`` for the ``policy`` label from now on (the servicer knows the policies)."""
        self.policy_label = labels
        self._children.clear()

    def observe(self, *, policy: str, result: str, code: str, seconds: float) -> None:
        policy = self.policy_label(policy)
        key = (policy, result, code)
        record = self._children.get(key)
        if record is None:
            record = self._record(policy, result, code)
            if len(self._children) < 4096:  # policies bounded by PolicyLabels, codes fixed
                self._children[key] = record
        record(seconds)

    def _record(self, policy: str, result: str, code: str) -> Callable[[float], None]:
        """One queued update (legation._prom) moving the decision, error and latency series."""
        decided = incrementer(self.decisions.labels(policy, result), direct=True)
        latency = observer(self.latency.labels(policy), direct=True)
        error = None
        if code and result in ("error", "would_deny") and code not in ("denied",):
            error = incrementer(self.errors.labels(policy, code), direct=True)

        def apply(seconds: float) -> None:
            decided(1)
            if error is not None:
                error(1)
            latency(seconds)

        def apply_many(batch: list[float]) -> None:
            latency.many([float(s) for s in batch])  # first: only it could raise
            decided(len(batch))
            if error is not None:
                error(len(batch))

        return queued(apply, apply_many)

    def watch_reloads(self, checks: Mapping[str, object]) -> None:
        """Export ``legation_extauthz_policy_reload_failures_total{check}`` for every check
        with a policy store (policy versions refused: compile errors, engine crashes, hangs).
        Called again after a config swap, it follows the new checks (registered once)."""
        collector = getattr(self, "_reload_failures", None)
        if collector is None:
            self._reload_failures = _ReloadFailures(checks)
            self._registry.register(self._reload_failures)
        else:
            collector.follow(checks)


class _ReloadFailures:
    def __init__(self, checks: Mapping[str, object]) -> None:
        self._stores: list[tuple[str, Callable[[], int]]] = []
        self.follow(checks)

    def follow(self, checks: Mapping[str, object]) -> None:
        stores: list[tuple[str, Callable[[], int]]] = []
        for name, check in checks.items():
            store = getattr(check, "store", None)
            if store is not None and hasattr(store, "failed_reloads"):
                stores.append((name, _failed_reloads(store)))
        self._stores = stores

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "legation_extauthz_policy_reload_failures",
            "policy versions that did not replace the running one (compile error, engine "
            "crash or timeout in the probe), by check",
            labels=["check"],
        )
        for name, count in self._stores:
            family.add_metric([name], count())
        yield family


def _failed_reloads(store: Any) -> Callable[[], int]:
    return lambda: int(store.failed_reloads)


_encode = json.JSONEncoder(separators=(",", ":")).encode


class DecisionLog:
    """Appends one JSON object per decision to a file, or to a logger when ``target`` is "-".

    File writes are buffered and flushed by a timer on the running event loop, at most
    ``flush_interval_s`` after the first unflushed line (and when the buffer fills, and on close).
    """

    def __init__(self, target: str | None, *, flush_interval_s: float = 0.2) -> None:
        self._file: IO[str] | None = None
        self._to_logger = target == "-"
        self._lock = threading.Lock()
        self._flush_interval_s = flush_interval_s
        self._flush_pending = False
        if target and target != "-":
            path = Path(target)
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = path.open("a", buffering=1 << 16)

    @property
    def enabled(self) -> bool:
        return self._file is not None or self._to_logger

    def write(self, entry: dict[str, Any]) -> None:
        entry["time"] = time.time()
        line = _encode(entry)
        if self._to_logger:
            decision_logger.info(line)
            return
        with self._lock:
            if self._file is None:
                return
            self._file.write(line + "\n")
            if not self._flush_pending:
                self._flush_pending = True
                try:
                    asyncio.get_running_loop().call_later(self._flush_interval_s, self.flush)
                except RuntimeError:  # no loop (a synchronous caller): flush now
                    self._flush_pending = False
                    self._file.flush()

    def flush(self) -> None:
        with self._lock:
            self._flush_pending = False
            if self._file is not None:
                self._file.flush()

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


TRACER = CallTracer("extauthz")
"""The service's spans: one per check, under the Envoy span that called (see
:mod:`legation.tracing.spans`)."""


def trace_decision(
    parent: SpanContext,
    seconds: float,
    result: str,
    policy: str,
    checks: Iterable[str],
    code: str,
    transport: str,
) -> None:
    """Record the span of one decision that took ``seconds`` and ended now. Names only: the
    policy and checks of the route, the result and its code; nothing from the request."""
    end = time.time_ns()
    TRACER.record(
        "legation.extauthz check",
        parent,
        start_ns=end - int(seconds * 1e9),
        end_ns=end,
        attributes={
            "legation.decision": result,
            "legation.policy": policy,
            "legation.checks": ",".join(checks),
            "legation.code": code or None,
            "legation.transport": transport,
        },
        error=result == "error",
    )
