"""The one error type of the ext_proc package.

``code`` is stable snake_case; the servicer turns it into an Envoy response and a metric label at
exactly one place (:mod:`legation.extproc.servicer`).
"""

from __future__ import annotations

from legation.errors import LegationError


class ExtProcError(LegationError):
    """Something went wrong while processing one HTTP request (a filter raised, timed out, ...)."""

    code = "extproc_error"
