"""The capture package's one error type, with stable snake_case codes.

Codes: ``capture_unavailable`` (not root, or a tool or kernel feature is missing: the message names
it), ``capture_failed`` (a command that sets up or removes a namespace, link or rule failed: the
message names the command and its error output), ``capture_in_use`` (what a start would take as a
leftover belongs to a live run: nothing is removed).
"""

from __future__ import annotations

from legation.errors import LegationError


class CaptureError(LegationError):
    """A network namespace, link or capture rule problem."""

    code = "capture_failed"
