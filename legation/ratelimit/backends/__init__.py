"""Counter stores behind one small Protocol; built-ins and third parties register as plugins.

A backend is selected by name (entry-point group ``legation.ratelimit.backends``, plugin kind
``ratelimit.backend``): its factory's ``validate(raw)`` checks the options, ``create(config)``
builds the :class:`Backend`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from legation.ratelimit.algorithms import Decision, Hit

__all__ = ["Backend", "Decision", "Hit"]


@runtime_checkable
class Backend(Protocol):
    """Where counters live."""

    async def hit(self, hits: Sequence[Hit], now_ms: int) -> list[Decision]:
        """Count every hit at ``now_ms`` (each atomically on its own counter) and return one
        decision per hit, in order. A networked store does this in one round trip. Raises
        :class:`~legation.ratelimit.errors.RateLimitError` (``backend_unavailable``) when the
        store does not answer within its timeout; never blocks longer than that."""
        ...

    async def close(self) -> None:
        """Release connections. The backend is not used afterwards."""
        ...
