"""``header_route``: compute a routing header from the request, then let Envoy's route table pick.

Rules are tried in order; the first that matches sets ``header`` to its ``value`` and the route
cache is cleared, so Envoy matches routes again and a route on that header picks the cluster
(canary by cohort, sticky A/B). A rule reads one source (a cookie, a header, or a JWT claim) and
matches it by ``equals``, ``one_of``, ``present``, or by a stable hash ``bucket`` of the value
(a sticky percentage of users).

```yaml
- name: header_route
  options:
    header: x-legation-cohort
    default: stable            # optional; without it the header is removed when nothing matches
    rules:
      - {cookie: canary, equals: "always", value: canary}
      - {jwt_claim: group, one_of: [beta, staff], value: canary}
      - {header: x-user-id, bucket: {below: 10}, value: canary}    # 10% of user ids
```

A client-sent ``header`` is never trusted: it is overwritten or removed. The JWT is read, not
verified: verify it first (Envoy ``jwt_authn`` or Legation's ext_authz) when routing is a security
decision.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Mapping
from typing import Any

from pydantic import Field, model_validator

from legation.extproc.exchange import Exchange
from legation.extproc.filters._options import Options, validate_options
from legation.extproc.sdk import Filter, Phase


class Bucket(Options):
    buckets: int = Field(default=100, ge=1, le=1_000_000)
    below: int = Field(ge=0)
    """Matches when hash(seed + value) % buckets < below."""
    seed: str = ""

    @model_validator(mode="after")
    def _range(self) -> Bucket:
        if self.below > self.buckets:
            raise ValueError(f"below ({self.below}) is more than buckets ({self.buckets})")
        return self


class Rule(Options):
    cookie: str | None = None
    header: str | None = None
    jwt_claim: str | None = None
    jwt_header: str = "authorization"
    equals: str | None = None
    one_of: tuple[str, ...] | None = None
    present: bool | None = None
    bucket: Bucket | None = None
    value: str = Field(min_length=1)

    @model_validator(mode="after")
    def _one_source_one_match(self) -> Rule:
        sources = [s for s in ("cookie", "header", "jwt_claim") if getattr(self, s) is not None]
        if len(sources) != 1:
            raise ValueError("a rule needs exactly one of cookie, header, jwt_claim")
        kinds = ("equals", "one_of", "present", "bucket")
        matches = [m for m in kinds if getattr(self, m) is not None]
        if len(matches) != 1:
            raise ValueError("a rule needs exactly one of equals, one_of, present, bucket")
        return self


# Names a routing header may not take: the listeners remove a client's copy of a routing header
# before routing, and rewriting these would break or steer the request itself.
_RESERVED = frozenset(
    {
        "host",
        "content-length",
        "content-type",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "upgrade",
        "authorization",
        "cookie",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-request-id",
        "traceparent",
    }
)


class HeaderRouteOptions(Options):
    header: str = Field(default="x-legation-route", min_length=1, pattern=r"^[A-Za-z0-9-]+$")
    rules: tuple[Rule, ...]
    default: str | None = None
    clear_route_cache: bool = True

    @model_validator(mode="after")
    def _has_rules(self) -> HeaderRouteOptions:
        if not self.rules:
            raise ValueError("rules: needs at least one rule")
        name = self.header.lower()
        if name in _RESERVED or name.startswith("x-envoy-"):
            raise ValueError(
                f"header: {self.header} frames or steers the request; a routing header needs a "
                "name of its own (the client's copy of it is removed before routing)"
            )
        return self


MAX_CLAIMS_B64 = 16 * 1024  # a longer (unverified) claims part is read as no claims


def jwt_claims(authorization: str | None) -> Mapping[str, Any]:
    """The claims of a bearer JWT, unverified; empty when absent or malformed."""
    if not authorization:
        return {}
    token = authorization[7:] if authorization[:7].lower() == "bearer " else authorization
    parts = token.split(".")
    if len(parts) != 3:
        return {}
    payload = parts[1]
    if len(payload) > MAX_CLAIMS_B64:
        return {}
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (ValueError, binascii.Error, RecursionError):  # deep nesting: malformed, not a crash
        return {}
    return claims if isinstance(claims, dict) else {}


def bucket_of(value: str, *, seed: str, buckets: int) -> int:
    """A stable bucket in [0, buckets): the same user lands in the same bucket on every request."""
    digest = hashlib.blake2b((seed + value).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % buckets


class HeaderRoute(Filter):
    name = "header_route"
    inline = True  # plain, non-blocking hooks bounded by the message: no thread hop
    phases = frozenset({Phase.REQUEST_HEADERS})

    def __init__(self, options: HeaderRouteOptions) -> None:
        self.options = options
        self._header = options.header.lower()
        self.computes = frozenset({self._header})

    def _source(self, rule: Rule, ex: Exchange, claims: dict[str, Any]) -> str | None:
        if rule.header is not None:
            return ex.request_headers.get(rule.header.lower())
        if rule.cookie is not None:
            return ex.cookie(rule.cookie)
        key = rule.jwt_header.lower()
        if key not in claims:
            claims[key] = jwt_claims(ex.request_headers.get(key))
        value = claims[key].get(rule.jwt_claim)
        if value is None:
            return None
        return value if isinstance(value, str) else json.dumps(value)

    def choose(self, ex: Exchange) -> str | None:
        claims: dict[str, Any] = {}
        for rule in self.options.rules:
            found = self._source(rule, ex, claims)
            if rule.present is not None:
                if (found is not None) == rule.present:
                    return rule.value
                continue
            if found is None:
                continue
            if rule.equals is not None:
                hit = found == rule.equals
            elif rule.one_of is not None:
                hit = found in rule.one_of
            else:
                b = rule.bucket
                assert b is not None
                hit = bucket_of(found, seed=b.seed, buckets=b.buckets) < b.below
            if hit:
                return rule.value
        return self.options.default

    def on_request_headers(self, ex: Exchange) -> None:
        value = self.choose(ex)
        had = ex.request_headers.get(self._header)
        if value is None:
            if had is None:
                return
            ex.remove_header(self._header)
        elif had == value:
            return
        else:
            ex.set_header(self._header, value)
        if self.options.clear_route_cache:
            ex.clear_route_cache()


class HeaderRouteFactory:
    name = "header_route"

    def validate(self, raw: Mapping[str, Any]) -> HeaderRouteOptions:
        return validate_options(HeaderRouteOptions, raw)

    def create(self, config: HeaderRouteOptions) -> HeaderRoute:
        return HeaderRoute(config)
