"""The one error type of the ext_authz package.

Every failure on the request path is an :class:`AuthzError` with a stable snake_case ``code``.
The code doubles as the ``code`` field of the decision log and as a metric label, and is turned
into an Envoy denial at exactly one place: :mod:`legation.extauthz.servicer`.
"""

from __future__ import annotations

from legation.errors import LegationError

# Codes that mean "the request is not acceptable" (a denial with the deny status); every other
# code means "we could not decide" (a denial with the error status: fail closed).
CLIENT_CODES = frozenset(
    {
        "missing_token",
        "malformed_token",
        "invalid_token",
        "token_expired",
        "token_not_yet_valid",
        "wrong_issuer",
        "wrong_audience",
        "bad_signature",
        "unknown_kid",
        "disallowed_algorithm",
        "missing_claim",
        "malformed_body",
        "malformed_path",
        "invalid_claim",
    }
)


class AuthzError(LegationError):
    """A check could not allow the request. ``status`` overrides the HTTP status when set."""

    code = "authz_error"

    def __init__(self, message: str, *, code: str | None = None, status: int | None = None) -> None:
        super().__init__(message, code=code)
        self.status = status

    @property
    def is_client_error(self) -> bool:
        return self.code in CLIENT_CODES
