"""The certs package's one error type, with stable snake_case codes.

Codes: ``ca_unreadable`` (a CA file cannot be read or parsed), ``ca_invalid`` (a file parses but is
not a usable CA: not a CA certificate, not EC/RSA, expired, key does not match), ``ca_insecure``
(the CA key file is accessible to group or others or owned by another user, or a CA or credential
directory is another user's or writable by group or others), ``ca_write_failed`` (a new CA cannot
be stored), ``bad_identity`` (a trust domain or name is not a valid SPIFFE id part, or is reserved
for xDS enrolment), ``enrolment_failed`` (a proxy's xDS credential cannot be written or recorded).
"""

from __future__ import annotations

from legation.errors import LegationError


class CertError(LegationError):
    """A certificate authority or workload identity problem. Never carries key material."""

    code = "cert_error"
