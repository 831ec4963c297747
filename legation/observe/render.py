"""The table ``legation top`` and ``legation status`` show: a pure function of a snapshot.

One table per scope, one line per key, like ``linkerd viz stat``::

    ROUTE             RPS  SUCCESS    P50     P90     P99
    reviews-default  12.3   99.18%  4.1ms  9.0ms  48.5ms

Rows are sorted by request rate (highest first, then by name), keys without requests in the
window are left out, and at most ``limit`` lines are shown per table (a last line says how many
more there are). Works on :class:`~legation.observe.aggregator.Snapshot` and on its
``to_dict()`` form alike, so the CLI can render what the status endpoint returned.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from legation.observe.aggregator import SCOPES, Snapshot

__all__ = ["render", "render_scope"]

_HEAD = {"route": ("ROUTE",), "pair": ("SOURCE", "DESTINATION"), "proxy": ("PROXY",)}


def render(
    snapshot: Snapshot | Mapping[str, Any],
    *,
    window: int | None = None,
    scopes: Sequence[str] = ("route", "pair", "proxy"),
    limit: int = 50,
) -> str:
    """Every scope's table for ``window`` (default: the snapshot's shortest), blank-line apart."""
    data = snapshot.to_dict() if isinstance(snapshot, Snapshot) else snapshot
    windows = [int(w) for w in data["windows"]]
    w = window if window is not None else min(windows)
    if w not in windows:
        raise ValueError(f"no {w} s window in this snapshot (has {windows})")
    head = f"window {w}s"
    tables = [render_scope(data, scope, w, limit=limit) for scope in scopes]
    return "\n\n".join([head, *tables]) + "\n"


def render_scope(data: Mapping[str, Any], scope: str, window: int, *, limit: int = 50) -> str:
    rows = []
    for row in data["scopes"].get(scope, []):
        stats = row["windows"][str(window)]
        if stats["requests"]:
            rows.append(([row["labels"][k] for k in SCOPES[scope]], stats))
    rows.sort(key=lambda r: (-r[1]["requests"], r[0]))
    lines: list[list[str]] = [[*_HEAD[scope], "RPS", "SUCCESS", "P50", "P90", "P99"]]
    for labels, s in rows[:limit]:
        lines.append(
            [
                *labels,
                _rps(s["rps"]),
                _pct(s["success"]),
                _ms(s["p50_ms"]),
                _ms(s["p90_ms"]),
                _ms(s["p99_ms"]),
            ]
        )
    text = _columns(lines, numeric_from=len(_HEAD[scope]))
    if not rows:
        text += "\n(no requests)"
    elif len(rows) > limit:
        text += f"\n... {len(rows) - limit} more"
    return text


def _columns(lines: list[list[str]], *, numeric_from: int) -> str:
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    out = []
    for line in lines:
        cells = [
            c.ljust(widths[i]) if i < numeric_from else c.rjust(widths[i])
            for i, c in enumerate(line)
        ]
        out.append("  ".join(cells).rstrip())
    return "\n".join(out)


def _rps(value: float) -> str:
    return f"{value:.1f}" if value < 1000 else f"{value:.0f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.2f}%"


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    if math.isinf(value):
        return ">60s"
    return f"{value:.1f}ms" if value < 1000 else f"{value / 1000:.2f}s"
