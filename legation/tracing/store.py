"""The embedded receiver's memory: the newest traces, bounded in traces and in spans.

A trace is kept from its first span on; traces are evicted oldest first (by when their first span
arrived) when there are more than ``max_traces`` of them or more than ``max_spans`` spans in all.
A single trace never holds more than ``max_spans`` spans (later ones are dropped and counted).
Each span keeps at most :data:`MAX_ATTRIBUTES` attributes, each value at most
:data:`MAX_VALUE` characters, and names at most :data:`MAX_NAME` characters, so the memory a
span costs is bounded whatever a sender puts in it (the receiver listens on loopback, but a
proxy's tags echo request paths).

Thread-safe: the gRPC receiver adds on its loop, the status server reads on its own.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

__all__ = ["MAX_ATTRIBUTES", "MAX_NAME", "MAX_VALUE", "Span", "TraceStore"]

MAX_ATTRIBUTES = 32
MAX_VALUE = 256
MAX_NAME = 128

Scalar = str | int | float | bool


@dataclass(frozen=True, kw_only=True)
class Span:
    """One span as the store keeps it; ids are lower-case hex (parent ``""`` for a root)."""

    trace_id: str
    span_id: str
    parent_id: str
    name: str
    service: str
    kind: str
    start_ns: int
    end_ns: int
    status: str = ""
    attributes: dict[str, Scalar] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {
            "trace_id": self.trace_id,
            "span_id": self.span_id,
            "parent_id": self.parent_id,
            "name": self.name,
            "service": self.service,
            "kind": self.kind,
            "start_ns": self.start_ns,
            "end_ns": self.end_ns,
            "status": self.status,
            "attributes": dict(self.attributes),
        }


def clip(value: str, limit: int = MAX_VALUE) -> str:
    return value if len(value) <= limit else value[: limit - 3] + "..."


class TraceStore:
    """Recent traces in bounded memory (see the module docstring)."""

    def __init__(self, *, max_traces: int, max_spans: int) -> None:
        if max_traces < 1 or max_spans < 1:
            raise ValueError("max_traces and max_spans must be >= 1")
        self.max_traces = max_traces
        self.max_spans = max_spans
        self._traces: OrderedDict[str, list[Span]] = OrderedDict()
        self._spans = 0
        self._lock = threading.Lock()
        self.received = 0
        self.dropped = 0
        self.evicted_traces = 0

    def add(self, spans: list[Span]) -> int:
        """Keep ``spans``; return how many were dropped (their trace at ``max_spans``)."""
        dropped = 0
        with self._lock:
            for span in spans:
                self.received += 1
                kept = self._traces.get(span.trace_id)
                if kept is None:
                    kept = self._traces[span.trace_id] = []
                if len(kept) >= self.max_spans:
                    dropped += 1
                    continue
                kept.append(span)
                self._spans += 1
                self._evict(keep=span.trace_id)
            self.dropped += dropped
        return dropped

    def _evict(self, *, keep: str) -> None:
        while len(self._traces) > self.max_traces or self._spans > self.max_spans:
            oldest = next(iter(self._traces))
            if oldest == keep:  # the trace being added is the oldest: only it is left
                break
            self._spans -= len(self._traces.pop(oldest))
            self.evicted_traces += 1

    def traces(self, *, route: str | None = None, limit: int = 20) -> list[list[Span]]:
        """The newest ``limit`` traces (newest last), those with a span on ``route`` if given."""
        with self._lock:
            picked = [
                list(spans)
                for spans in reversed(self._traces.values())
                if route is None or any(s.attributes.get("route") == route for s in spans)
            ][:limit]
        return picked[::-1]

    def trace(self, trace_id: str) -> list[Span] | None:
        with self._lock:
            spans = self._traces.get(trace_id.lower())
            return list(spans) if spans is not None else None

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "traces": len(self._traces),
                "spans": self._spans,
                "max_traces": self.max_traces,
                "max_spans": self.max_spans,
                "received": self.received,
                "dropped": self.dropped,
                "evicted_traces": self.evicted_traces,
            }
