"""The ``jwt`` check's configuration: providers (issuer, audiences, keys, algorithms, where the
token comes from, claims forwarded), validated when the service config loads (see
:mod:`legation.extauthz.jwt` for the rules and why)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from legation.extauthz._headers import bad_header_name
from legation.extauthz.jwks import check_jwks_url

_FAMILY = {"RS": "RSA", "PS": "RSA", "ES": "EC", "Ed": "OKP", "HS": "oct"}
SUPPORTED = frozenset(
    {
        "RS256",
        "RS384",
        "RS512",
        "PS256",
        "PS384",
        "PS512",
        "ES256",
        "ES384",
        "ES512",
        "EdDSA",
        "HS256",
        "HS384",
        "HS512",
    }
)


# where claims_to_metadata puts the claims in the CheckResponse dynamic metadata
METADATA_KEY = "jwt_claims"


class ProviderConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    issuer: str
    # required: the accepted ``aud`` values, or "any" (no audience check, explicitly)
    audiences: list[str] | Literal["any"] | None = None
    jwks_url: str | None = None
    # jwks_url may be http:// only for a loopback host, and only with this set (tests, local IdPs)
    allow_insecure_http: bool = False
    jwks_file: Path | None = None
    jwks: dict[str, Any] | None = None
    algorithms: list[str] = Field(default_factory=lambda: ["RS256"], min_length=1)
    leeway_s: float = Field(default=30, ge=0, le=600)
    required_claims: list[str] = Field(default_factory=list)
    claims_to_headers: dict[str, str] = Field(default_factory=dict)
    # claims Envoy gets as dynamic metadata (namespace envoy.filters.http.ext_authz, under
    # "jwt_claims"), e.g. for rate-limit descriptors keyed by user
    claims_to_metadata: list[str] = Field(default_factory=list)
    from_header: str | None = "authorization"
    header_prefix: str = "Bearer "
    from_cookie: str | None = None
    from_query: str | None = None
    jwks_cache_s: float = Field(default=300, gt=0)
    # an unknown kid refetches the JWKS at most this often: anyone can send unknown kids
    jwks_min_refetch_s: float = Field(default=5, ge=1)
    jwks_max_bytes: int = Field(default=1 << 20, ge=1024, le=16 << 20)
    jwks_timeout_s: float = Field(default=2, gt=0, le=30)

    @field_validator("claims_to_headers")
    @classmethod
    def _header_names(cls, value: dict[str, str]) -> dict[str, str]:
        for claim, header in value.items():
            problem = bad_header_name(header)
            if problem or header.startswith(":") or header.lower() == "host":
                raise ValueError(
                    f"claim {claim!r}: {header!r} cannot be a request header name"
                    f" ({problem or 'a pseudo-header or host'})"
                )
        return {claim: header.lower() for claim, header in value.items()}

    @model_validator(mode="after")
    def _semantics(self) -> ProviderConfig:
        if not self.audiences:
            raise ValueError(
                "audiences is required: the 'aud' values this provider accepts, "
                "or 'any' to accept tokens for any audience"
            )
        if self.jwks_url is not None:
            check_jwks_url(self.jwks_url, allow_insecure_http=self.allow_insecure_http)
        sources = [s for s in (self.jwks_url, self.jwks_file, self.jwks) if s is not None]
        if len(sources) != 1:
            raise ValueError("exactly one of jwks_url, jwks_file, jwks is required")
        for alg in self.algorithms:
            if alg not in SUPPORTED:
                raise ValueError(f"algorithm {alg!r} is not allowed (one of {sorted(SUPPORTED)})")
        if len({_FAMILY[a[:2]] == "oct" for a in self.algorithms}) > 1:
            raise ValueError("algorithms cannot mix HMAC (HS*) with public-key algorithms")
        if not (self.from_header or self.from_cookie or self.from_query):
            raise ValueError("a provider needs from_header, from_cookie or from_query")
        return self


class JwtConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    providers: list[ProviderConfig] = Field(min_length=1)
    cache_size: int = Field(default=10_000, ge=0)
