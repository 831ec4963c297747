"""The ``jwt`` check: verify a bearer token against configured providers.

Per provider: issuer, audiences, keys (:mod:`legation.extauthz.jwks`), an allow-list of
algorithms (``none`` is refused at config time, and symmetric and asymmetric algorithms cannot
be mixed, so an RSA public key can never be used as an HMAC secret), ``exp``/``nbf`` with leeway,
required claims, claims forwarded upstream as headers, and where the token comes from (a header,
a cookie or a query parameter). Verified tokens are cached by SHA-256 of the token until expiry.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import jwt as pyjwt
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from legation.errors import ConfigError
from legation.extauthz.checks import ALLOW, Decision
from legation.extauthz.config import pydantic_error
from legation.extauthz.errors import AuthzError
from legation.extauthz.jwks import KeySet
from legation.extauthz.request import RequestContext

_FAMILY = {"RS": "RSA", "PS": "RSA", "ES": "EC", "Ed": "OKP", "HS": "oct"}
SUPPORTED = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384",
                       "ES512", "EdDSA", "HS256", "HS384", "HS512"})


# where claims_to_metadata puts the claims in the CheckResponse dynamic metadata
METADATA_KEY = "jwt_claims"

class ProviderConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    issuer: str
    audiences: list[str] = Field(default_factory=list)
    jwks_url: str | None = None
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
    jwks_min_refetch_s: float = Field(default=5, ge=0)
    jwks_timeout_s: float = Field(default=2, gt=0, le=30)

    @model_validator(mode="after")
    def _semantics(self) -> ProviderConfig:
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


class _Provider:
    def __init__(self, config: ProviderConfig) -> None:
        self.config = config
        self._header = config.from_header.lower() if config.from_header else None
        self._prefix = config.header_prefix.lower()
        self._prefix_len = len(config.header_prefix)
        self.keys = KeySet(url=config.jwks_url, path=config.jwks_file, inline=config.jwks,
                           cache_s=config.jwks_cache_s, min_refetch_s=config.jwks_min_refetch_s,
                           timeout_s=config.jwks_timeout_s)

    def token(self, ctx: RequestContext) -> str | None:
        c = self.config
        if self._header and (value := ctx.headers.get(self._header)):
            if value[: self._prefix_len].lower() == self._prefix:
                return str(value[self._prefix_len:].strip())
        if c.from_cookie and (cookies := ctx.headers.get("cookie")):
            for part in cookies.split(";"):
                name, _, value = part.strip().partition("=")
                if name == c.from_cookie and value:
                    return value
        if c.from_query and "?" in ctx.path:
            values = parse_qs(urlsplit(ctx.path).query).get(c.from_query)
            if values:
                return values[0]
        return None

    async def verify(self, token: str) -> dict[str, Any]:
        c = self.config
        try:
            header = pyjwt.get_unverified_header(token)
        except pyjwt.DecodeError:
            raise AuthzError("the token is not a JWT", code="malformed_token") from None
        alg = header.get("alg")
        if alg not in c.algorithms:
            raise AuthzError(f"algorithm {alg!r} is not allowed", code="disallowed_algorithm")
        key = await self.keys.get(header.get("kid"))
        if key.key_type != _FAMILY[str(alg)[:2]]:
            raise AuthzError(f"algorithm {alg} does not fit a {key.key_type} key",
                             code="disallowed_algorithm")
        try:
            return pyjwt.decode(
                token, key.key, algorithms=[alg], issuer=c.issuer,
                audience=c.audiences or None, leeway=c.leeway_s,
                options={"require": ["exp", *c.required_claims],
                         "verify_aud": bool(c.audiences)},
            )
        except pyjwt.ExpiredSignatureError:
            raise AuthzError("the token has expired", code="token_expired") from None
        except pyjwt.ImmatureSignatureError:
            raise AuthzError("the token is not valid yet", code="token_not_yet_valid") from None
        except (pyjwt.InvalidAudienceError, pyjwt.MissingRequiredClaimError) as e:
            code = "wrong_audience" if isinstance(e, pyjwt.InvalidAudienceError) else \
                "missing_claim"
            if isinstance(e, pyjwt.MissingRequiredClaimError) and e.claim == "aud":
                code = "wrong_audience"
            raise AuthzError(f"the token was refused: {e}", code=code) from None
        except pyjwt.InvalidIssuerError:
            raise AuthzError("the token has the wrong issuer", code="wrong_issuer") from None
        except pyjwt.InvalidSignatureError:
            raise AuthzError("the token signature is invalid", code="bad_signature") from None
        except pyjwt.DecodeError:
            raise AuthzError("the token cannot be decoded", code="malformed_token") from None
        except pyjwt.InvalidTokenError as e:
            raise AuthzError(f"the token is invalid: {type(e).__name__}",
                             code="invalid_token") from None


class JwtCheck:
    name = "jwt"

    def __init__(self, config: JwtConfig) -> None:
        self.config = config
        self.providers = [_Provider(p) for p in config.providers]
        self._by_issuer = {p.config.issuer: p for p in self.providers}
        self._cache: OrderedDict[bytes, tuple[_Provider, dict[str, Any], float]] = OrderedDict()

    async def check(self, ctx: RequestContext) -> Decision:
        try:
            return await self._check(ctx)
        except AuthzError as e:
            if e.is_client_error and e.status is None:
                e.status = 401  # as Envoy's jwt_authn: the client must authenticate (again)
            raise

    async def _check(self, ctx: RequestContext) -> Decision:
        provider, token = self._find(ctx)
        digest = hashlib.sha256(token.encode()).digest()
        hit = self._cache.get(digest)
        if hit is not None and hit[0] is provider and time.time() < hit[2]:
            claims = hit[1]
        else:
            claims = await provider.verify(token)
            self._remember(digest, provider, claims)
        ctx.claims = claims
        ctx.jwt_provider = provider.config.name
        config = provider.config
        if not (config.claims_to_headers or config.claims_to_metadata):
            return ALLOW
        headers = {h: _header_value(claims[c]) for c, h in
                   config.claims_to_headers.items() if c in claims}
        metadata = {METADATA_KEY: {c: _header_value(claims[c])
                                   for c in config.claims_to_metadata if c in claims}}
        return Decision(allowed=True, headers=headers,
                        dynamic_metadata=metadata if config.claims_to_metadata else {})

    def _find(self, ctx: RequestContext) -> tuple[_Provider, str]:
        token = None
        for provider in self.providers:
            token = provider.token(ctx)
            if token is not None:
                break
        if token is None:
            raise AuthzError("no bearer token", code="missing_token")
        if len(self.providers) == 1:
            return self.providers[0], token
        try:
            issuer = pyjwt.decode(token, options={"verify_signature": False}).get("iss")
        except pyjwt.DecodeError:
            raise AuthzError("the token is not a JWT", code="malformed_token") from None
        provider = self._by_issuer.get(issuer)  # type: ignore[arg-type]
        if provider is None:
            raise AuthzError("no provider for the token's issuer", code="wrong_issuer")
        return provider, token

    def _remember(self, digest: bytes, provider: _Provider, claims: dict[str, Any]) -> None:
        if self.config.cache_size == 0:
            return
        until = float(claims["exp"]) + provider.config.leeway_s
        nbf = claims.get("nbf")
        if isinstance(nbf, int | float) and nbf - provider.config.leeway_s > time.time():
            return  # not valid yet even with leeway (decode would have refused): never cache
        self._cache[digest] = (provider, claims, until)
        while len(self._cache) > self.config.cache_size:
            self._cache.popitem(last=False)

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        self._cache.clear()


def _header_value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


class JwtCheckFactory:
    name = "jwt"

    def validate(self, raw: Any) -> JwtConfig:
        try:
            return JwtConfig.model_validate(raw)
        except ValidationError as e:
            raise ConfigError(pydantic_error(e)) from None

    def create(self, config: JwtConfig) -> JwtCheck:
        return JwtCheck(config)
