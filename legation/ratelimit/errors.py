"""The rate-limit package's one error type.

Config problems raise :class:`legation.errors.ConfigError` (shared with every package, because the
plugin contract promises it); everything that goes wrong while answering a request raises
:class:`RateLimitError`, whose ``code`` the servicer turns into a gRPC status and a metric label.
"""

from __future__ import annotations

from legation.errors import LegationError


class RateLimitError(LegationError):
    """A request could not be decided. ``code`` is one of:

    * ``backend_unavailable``: the counter store did not answer within its timeout (or refused);
    * ``invalid_request``: the RateLimitRequest is malformed (no domain, no descriptors, empty key).
    """

    code = "ratelimit_error"
