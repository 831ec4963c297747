"""A fused route's rate limits: descriptors from the call's headers, as Envoy's route actions build
them, and the limiter's answer as the headers Envoy's rate-limit filter would add.

Descriptors (Envoy's ``RateLimitPolicyEntryImpl::populateDescriptors``): entries in order; a
``request_headers`` entry whose header is absent drops the whole descriptor, or only itself with
``skip_if_absent``; ``remote_address`` reads the address Envoy put in
:data:`~legation.fastpath.contract.REMOTE_ADDRESS_HEADER` (absent: the descriptor is dropped, as
Envoy drops it for a non-IP address). No descriptor left: no rate-limit call, as Envoy makes none.
One difference HTTP mode imposes: a header a client sends twice reaches the call-out joined with
``,`` (Envoy's ext_authz joins them), where Envoy's own descriptor takes the first value.

Headers (Envoy's ``XRateLimitHeaderUtils``, ``DRAFT_VERSION_03``): among the statuses with a
current limit, the one with the fewest remaining gives ``x-ratelimit-limit`` (its limit, then
``, <limit>;w=<window seconds>[;name="..."]`` for every status), ``x-ratelimit-remaining`` and
``x-ratelimit-reset`` (whole seconds). A limit name that is not printable ASCII without ``"`` or
``\\`` is left out rather than written into a header.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2 as common_pb2
from envoy.service.ratelimit.v3 import rls_pb2

__all__ = [
    "Entry",
    "GenericEntry",
    "HeaderEntry",
    "RemoteEntry",
    "rate_limit_request",
    "x_ratelimit_headers",
]


@dataclass(frozen=True, slots=True)
class GenericEntry:
    key: str
    value: str


@dataclass(frozen=True, slots=True)
class HeaderEntry:
    header: str  # lower-case
    key: str
    skip_if_absent: bool = False


@dataclass(frozen=True, slots=True)
class RemoteEntry:
    pass


Entry = GenericEntry | HeaderEntry | RemoteEntry
_NAME = re.compile(r"[\x20\x21\x23-\x5b\x5d-\x7e]{1,256}")  # printable, no quote or backslash

_WINDOW = {
    rls_pb2.RateLimitResponse.RateLimit.SECOND: 1,
    rls_pb2.RateLimitResponse.RateLimit.MINUTE: 60,
    rls_pb2.RateLimitResponse.RateLimit.HOUR: 3600,
    rls_pb2.RateLimitResponse.RateLimit.DAY: 86400,
    rls_pb2.RateLimitResponse.RateLimit.WEEK: 604800,
    rls_pb2.RateLimitResponse.RateLimit.MONTH: 2592000,
    rls_pb2.RateLimitResponse.RateLimit.YEAR: 31536000,
}


def rate_limit_request(
    domain: str,
    descriptors: Sequence[Sequence[Entry]],
    headers: Mapping[str, str],
    remote: str | None,
) -> rls_pb2.RateLimitRequest | None:
    """The request Envoy would send for these descriptors, or None when none populates."""
    request = rls_pb2.RateLimitRequest(domain=domain)
    for spec in descriptors:
        entries: list[tuple[str, str]] = []
        for e in spec:
            if isinstance(e, GenericEntry):
                entries.append((e.key, e.value))
            elif isinstance(e, HeaderEntry):
                value = headers.get(e.header)
                if value is None:
                    if e.skip_if_absent:
                        continue
                    break
                entries.append((e.key, value))
            else:
                if not remote:
                    break
                entries.append(("remote_address", remote))
        else:
            d = request.descriptors.add()
            for key, value in entries:
                d.entries.append(common_pb2.RateLimitDescriptor.Entry(key=key, value=value))
    return request if request.descriptors else None


def x_ratelimit_headers(response: rls_pb2.RateLimitResponse) -> list[tuple[str, str]]:
    """The ``x-ratelimit-*`` headers Envoy derives from ``response`` (empty without a limit)."""
    closest = None
    policy = []
    for status in response.statuses:
        if not status.HasField("current_limit"):
            continue
        if closest is None or status.limit_remaining < closest.limit_remaining:
            closest = status
        window = _WINDOW.get(status.current_limit.unit)
        if window:
            part = f", {status.current_limit.requests_per_unit};w={window}"
            name = status.current_limit.name
            if name and _NAME.fullmatch(name):  # a limit's name from the config: quoted safely
                part += f';name="{name}"'
            policy.append(part)
    if closest is None:
        return []
    return [
        ("x-ratelimit-limit", f"{closest.current_limit.requests_per_unit}{''.join(policy)}"),
        ("x-ratelimit-remaining", str(closest.limit_remaining)),
        ("x-ratelimit-reset", str(closest.duration_until_reset.seconds)),
    ]
