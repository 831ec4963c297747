"""The root of Legation's error types.

Each package defines one error type deriving from :class:`LegationError` with a stable snake_case
``code``; the code doubles as a metric label and is translated to a gRPC status, an Envoy response
or a CLI message at exactly one boundary.
"""

from __future__ import annotations


class LegationError(Exception):
    """Base class: ``code`` is stable and machine-readable, the message is for people."""

    code: str = "error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class ConfigError(LegationError):
    """Invalid configuration. The message starts with the file (when there is one) and the field."""

    code = "invalid_config"
