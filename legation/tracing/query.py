"""``/traces`` on the control plane's status endpoint: the embedded receiver's traces as JSON.

Query parameters (all optional): ``id`` (a trace id, 32 hex digits), ``route`` (traces with a
span on that mesh route), ``limit`` (how many of the newest, 1-1000, default 10). A bad parameter
is a 400 naming it; no embedded receiver (no ``tracing`` block, or another collector) a 404.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from legation.tracing.store import Span, TraceStore

__all__ = ["MAX_LIMIT", "traces_document"]

MAX_LIMIT = 1000
_TRACE_ID = re.compile(r"^[0-9a-fA-F]{32}$")


def traces_document(
    store: TraceStore | None, query: Mapping[str, str]
) -> tuple[int, dict[str, Any]]:
    """(HTTP status, JSON document) for ``/traces`` with ``query``."""
    if store is None:
        return 404, {"error": "no embedded trace receiver (the mesh has no tracing: embedded)"}
    unknown = sorted(set(query) - {"id", "route", "limit"})
    if unknown:
        return 400, {"error": f"unknown parameter {unknown[0]!r} (allowed: id, limit, route)"}
    raw_limit = query.get("limit", "10")
    if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= MAX_LIMIT:
        return 400, {"error": f"limit: expected 1 to {MAX_LIMIT}"}
    trace_id = query.get("id")
    if trace_id is not None:
        if not _TRACE_ID.match(trace_id):
            return 400, {"error": "id: expected a trace id (32 hex digits)"}
        found = store.trace(trace_id)
        traces = [found] if found else []
    else:
        traces = store.traces(route=query.get("route") or None, limit=int(raw_limit))
    return 200, {"stats": store.stats(), "traces": [_trace(spans) for spans in traces]}


def _trace(spans: list[Span]) -> dict[str, Any]:
    return {"trace_id": spans[0].trace_id, "spans": [s.as_json() for s in spans]}
