"""Peer-chosen text (node ids, NACK messages) made safe to log: quoted, escaped, bounded."""

from __future__ import annotations


def escaped(text: str, limit: int = 200) -> str:
    """``repr`` of at most ``limit`` characters of ``text``: control, non-printable and
    bidirectional characters come out as escapes, never raw; a cut is marked."""
    if len(text) > limit:
        return repr(text[:limit]) + f"...(+{len(text) - limit} chars)"
    return repr(text)
