"""What Envoy's ext_authz filter (HTTP mode) and the call-out server agree on, in one place.

In HTTP mode Envoy forwards only the headers its config lists, both ways, so the server and the
filter config must be built from the same names:

* Envoy -> server: the request path behind :data:`PATH_PREFIX`; method, Host, Authorization,
  Content-Length and the ``allowed_headers``; plus the route's own settings in
  :data:`POLICY_HEADER` and :data:`CHECKS_HEADER`, set from the route's metadata by the
  filter's ``http_service`` (``headers_to_add``: Envoy *sets* them, so a client cannot choose
  its policy; the filter builder also refuses an ``allowed_headers`` entry that would let a
  client's ``x-legation-*`` header through).
* server -> Envoy, allowed (200): the decision's upstream headers, each name either under
  :data:`HEADER_PREFIX` or listed in ``upstream_headers`` (the filter's
  ``allowed_upstream_headers``); removals in ``x-envoy-auth-headers-to-remove``; headers for the
  client's response in ``allowed_client_headers_on_success`` (``client_headers``).
* server -> Envoy, denied (any other status): status, body and every header but the framing ones
  go to the client (``allowed_client_headers`` left empty means all).
"""

from __future__ import annotations

from collections.abc import Iterable

PATH_PREFIX = "/legation/check"
HEADER_PREFIX = "x-legation-"
POLICY_HEADER = "x-legation-policy"
CHECKS_HEADER = "x-legation-checks"
REMOVE_HEADER = "x-envoy-auth-headers-to-remove"  # Envoy's own name
ROUTE_HEADER = "x-legation-route"
"""A fused route's name: set from the route's metadata by the fused filter (fused decisions)."""
REMOTE_ADDRESS_HEADER = "x-legation-remote-address"
"""The client address Envoy trusts (``%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%``), for
``remote_address`` descriptors; set by Envoy on fused calls, never taken from a client."""
RATELIMIT_HEADERS = ("x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset")
"""What Envoy's rate-limit filter adds (``DRAFT_VERSION_03``); a fused answer adds the same."""


class Forwarded:
    """The names Envoy passes on from an allowed answer: ``HEADER_PREFIX`` plus ``names``."""

    __slots__ = ("names",)

    def __init__(self, names: Iterable[str] = ()) -> None:
        self.names = frozenset(n.lower() for n in names)

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        name = name.lower()
        return name.startswith(HEADER_PREFIX) or name in self.names

    def __repr__(self) -> str:
        return f"Forwarded({sorted(self.names)!r})"
