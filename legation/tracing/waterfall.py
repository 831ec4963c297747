"""A trace as a waterfall on a terminal: one line per span, indented under its parent, a bar
showing when it ran within the trace, its duration and what it did.

::

    trace 4bf92f3577b34da6a3ce929d0e0e4736  5 spans  15.4 ms  route admin
      offset   duration
      0.0 ms   15.4 ms  |##############################|  ingress: ingress  GET /admin 200
      0.3 ms    7.5 ms  | ##############               |    ingress: async ...Check egress
      ...

The spans come as ``/traces`` serves them (:func:`legation.tracing.query.traces_document`).
A span whose parent is not in the trace (not received yet, or evicted) is shown as a root.
Whoever can reach the receiver names spans and attributes, so every text printed has its
control characters (terminal escapes, newlines) replaced by ``?``.
"""

from __future__ import annotations

import unicodedata
import urllib.parse
from typing import Any

__all__ = ["render"]

BAR = 30
_SHOWN = ("legation.decision", "legation.policy", "legation.limit", "legation.chain")


def render(trace: dict[str, Any], *, width: int = BAR) -> str:
    spans: list[dict[str, Any]] = trace["spans"]
    if not spans:
        return f"trace {_safe(trace['trace_id'])}  (no spans)"
    start = min(s["start_ns"] for s in spans)
    end = max(s["end_ns"] for s in spans)
    total = max(end - start, 1)
    routes = sorted({str(s["attributes"]["route"]) for s in spans if "route" in s["attributes"]})
    head = f"trace {_safe(trace['trace_id'])}  {len(spans)} spans  {_ms(end - start)}"
    if routes:
        head += "  route " + ", ".join(_safe(r) for r in routes if not r.startswith("inbound-"))
    lines = [head.rstrip(), "    offset  duration"]
    for depth, s in _ordered(spans):
        a = (s["start_ns"] - start) * width // total
        b = max(a + 1, -(-(s["end_ns"] - start) * width // total))
        bar = " " * a + "#" * (min(b, width) - a) + " " * (width - min(b, width))
        label = _safe(f"{s['service']}: {s['name']}")
        lines.append(
            f"{_ms(s['start_ns'] - start):>10}{_ms(s['end_ns'] - s['start_ns']):>10}  "
            f"|{bar}|  {'  ' * depth}{label}{_details(s)}"
        )
    return "\n".join(lines)


def _safe(value: object) -> str:
    """``value`` as text a terminal prints literally: control characters become ``?``."""
    text = str(value)
    if text.isprintable():
        return text
    return "".join(c if unicodedata.category(c)[0] != "C" else "?" for c in text)


def _ordered(spans: list[dict[str, Any]]) -> list[tuple[int, dict[str, Any]]]:
    """Depth-first by parent, siblings by start time."""
    ids = {s["span_id"] for s in spans}
    children: dict[str, list[dict[str, Any]]] = {}
    roots = []
    for s in sorted(spans, key=lambda s: (s["start_ns"], s["span_id"])):
        if s["parent_id"] and s["parent_id"] in ids and s["parent_id"] != s["span_id"]:
            children.setdefault(s["parent_id"], []).append(s)
        else:
            roots.append(s)
    out: list[tuple[int, dict[str, Any]]] = []
    seen: set[str] = set()
    stack = [(0, s) for s in reversed(roots)]
    while stack:
        depth, s = stack.pop()
        if s["span_id"] in seen:  # a cycle of parents (a broken sender): print each span once
            continue
        seen.add(s["span_id"])
        out.append((depth, s))
        stack.extend((depth + 1, c) for c in reversed(children.get(s["span_id"], [])))
    out.extend((0, s) for s in spans if s["span_id"] not in seen)
    return out


def _details(s: dict[str, Any]) -> str:
    a = s["attributes"]
    parts = []
    if "http.method" in a and "http.url" in a:
        path = urllib.parse.urlsplit(str(a["http.url"])).path or "/"
        parts.append(f"{a['http.method']} {path}")
    if "http.status_code" in a:
        parts.append(str(a["http.status_code"]))
    if "route" in a and "http.method" in a:
        parts.append(f"route={a['route']}")
    parts += [f"{k.removeprefix('legation.')}={a[k]}" for k in _SHOWN if k in a]
    if s.get("status") == "error":
        parts.append("ERROR")
    return _safe("  " + " ".join(parts)) if parts else ""


def _ms(ns: int) -> str:
    return f"{ns / 1e6:.1f} ms" if ns >= 10_000_000 else f"{ns / 1e6:.2f} ms"
