"""Golden metrics (request rate, success rate, latency percentiles) per route, pair and proxy.

The :class:`Aggregator` takes one :class:`Entry` per request (what an Envoy access-log entry
says, already reduced by :mod:`legation.observe.als`) and keeps a :class:`SlidingWindow` per key
in three scopes:

=========  =======================  =====================================================
scope      labels                   counts
=========  =======================  =====================================================
route      ``route``                every entry except a sidecar's inbound side (the
                                    sending proxy counted it already)
pair       ``source, destination``  the same entries; see :mod:`legation.observe.names`
proxy      ``proxy``                every entry, by node id, inbound side included
=========  =======================  =====================================================

**Cardinality.** Label values come from Envoy's config (route names, cluster names, node ids),
never from a request: no path, host, header or method is ever a label. Each scope still admits at
most its :class:`Limits` of keys; past the limit a new key first evicts a key idle for the whole
horizon, else it is counted under :data:`~legation.observe.names.OTHER` (and the scope's
``overflowed`` count goes up). Memory is therefore bounded by the limits times one window.

A request is a failure when its response code is 5xx or 0 (no response was sent).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from legation.observe.names import NO_ROUTE, OTHER, destination, label_value, source
from legation.observe.window import HORIZON_S, SlidingWindow, WindowStats

__all__ = ["SCOPES", "Aggregator", "Entry", "Limits", "Row", "Snapshot"]

SCOPES: dict[str, tuple[str, ...]] = {
    "route": ("route",),
    "pair": ("source", "destination"),
    "proxy": ("proxy",),
}
"""Each scope and its label names, in the order keys hold them."""

INBOUND_LOG = "inbound"
"""The access-log name of a sidecar's inbound listener (:mod:`legation.observe.envoy_config`)."""


@dataclass(frozen=True, slots=True)
class Entry:
    """One finished request, as the aggregator needs it."""

    node_id: str
    node_cluster: str
    log_name: str
    route: str
    upstream_cluster: str
    code: int
    duration_ms: float


@dataclass(frozen=True, kw_only=True)
class Limits:
    """The most keys each scope holds (defaults sized for a mesh of a few hundred services)."""

    routes: int = 500
    pairs: int = 1000
    proxies: int = 500

    def of(self, scope: str) -> int:
        return {"route": self.routes, "pair": self.pairs, "proxy": self.proxies}[scope]


@dataclass(frozen=True, slots=True)
class Row:
    """One key's numbers: ``windows`` maps a window length (s) to its stats."""

    scope: str
    labels: tuple[str, ...]
    windows: dict[int, WindowStats]
    total: int
    total_failures: int


@dataclass(frozen=True)
class Snapshot:
    """Every key of every scope, at one moment; ``overflowed`` counts, per scope, entries
    counted under ``other`` because the scope was full."""

    windows: tuple[int, ...]
    rows: dict[str, list[Row]]
    overflowed: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for the status endpoint (latencies in ms; None without requests, ``inf``
        past the last bucket, which Python's json writes as ``Infinity``)."""
        return {
            "windows": list(self.windows),
            "overflowed": dict(self.overflowed),
            "scopes": {
                scope: [
                    {
                        "labels": dict(zip(SCOPES[scope], row.labels, strict=True)),
                        "total": row.total,
                        "failures": row.total_failures,
                        "windows": {
                            str(w): {
                                "requests": s.requests,
                                "failures": s.failures,
                                "rps": s.rps,
                                "success": s.success,
                                "p50_ms": s.p50_ms,
                                "p90_ms": s.p90_ms,
                                "p99_ms": s.p99_ms,
                            }
                            for w, s in row.windows.items()
                        },
                    }
                    for row in rows
                ]
                for scope, rows in self.rows.items()
            },
        }


class _Scope:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.keys: dict[tuple[str, ...], SlidingWindow] = {}
        self.overflowed = 0

    def window(self, key: tuple[str, ...], second: int) -> SlidingWindow:
        found = self.keys.get(key)
        if found is not None:
            return found
        if len(self.keys) >= self.limit:
            idle = [
                k
                for k, w in self.keys.items()
                if w.last_second <= second - HORIZON_S and OTHER not in k
            ]
            for k in idle:
                del self.keys[k]
            if len(self.keys) >= self.limit:
                self.overflowed += 1
                key = tuple(OTHER for _ in key)
                return self.keys.setdefault(key, SlidingWindow())
        return self.keys.setdefault(key, SlidingWindow())


class Aggregator:
    """Thread-safe: entries arrive on the access-log server's loop, snapshots are taken by the
    status endpoint or a Prometheus scrape on other threads."""

    def __init__(
        self,
        *,
        windows: tuple[int, ...] = (10, 60),
        limits: Limits | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        for w in windows:
            if not 0 < w <= HORIZON_S:
                raise ValueError(f"a window is 1..{HORIZON_S} s, not {w}")
        self.windows = windows
        self.limits = limits or Limits()
        self._clock = clock
        self._lock = threading.Lock()
        self._scopes = {s: _Scope(self.limits.of(s)) for s in SCOPES}

    def record(self, entry: Entry) -> None:
        second = int(self._clock())
        failed = entry.code >= 500 or entry.code == 0
        keys: list[tuple[str, tuple[str, ...]]] = [("proxy", (label_value(entry.node_id),))]
        dest = destination(entry.upstream_cluster)
        if entry.log_name != INBOUND_LOG and dest is not None:
            keys.append(("route", (label_value(entry.route) if entry.route else NO_ROUTE,)))
            keys.append(("pair", (source(entry.node_cluster, entry.node_id), dest)))
        with self._lock:
            for scope, key in keys:
                self._scopes[scope].window(key, second).record(second, entry.duration_ms, failed)

    def snapshot(self) -> Snapshot:
        """Every key's windows now. The lock is taken per key, so a snapshot of thousands of
        keys (~0.1 ms each) never holds up the access-log server for more than one key."""
        now = int(self._clock())
        with self._lock:
            keys = {scope: list(sc.keys.items()) for scope, sc in self._scopes.items()}
            overflowed = {scope: sc.overflowed for scope, sc in self._scopes.items()}
        rows: dict[str, list[Row]] = {}
        for scope, items in keys.items():
            out = []
            for key, win in items:
                with self._lock:
                    out.append(
                        Row(
                            scope=scope,
                            labels=key,
                            windows=win.stats_for(now, self.windows),
                            total=win.total,
                            total_failures=win.total_failures,
                        )
                    )
            rows[scope] = sorted(out, key=lambda r: r.labels)
        return Snapshot(windows=self.windows, rows=rows, overflowed=overflowed)
