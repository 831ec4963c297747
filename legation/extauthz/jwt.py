"""The ``jwt`` check: verify a bearer token against configured providers.

Per provider: issuer, audiences, keys (:mod:`legation.extauthz.jwks`), an allow-list of
algorithms (``none`` is refused at config time, and symmetric and asymmetric algorithms cannot
be mixed, so an RSA public key can never be used as an HMAC secret), ``exp``/``nbf`` with leeway,
required claims, claims forwarded upstream as headers, and where the token comes from (a header,
a cookie or a query parameter). Verified tokens are cached by SHA-256 of the token until expiry.

Hostile-input rules (each has a test in ``tests/security/test_extauthz_jwt.py``):

* ``audiences`` is required: the ``aud`` values this provider accepts, or ``any`` to accept a
  token whatever its audience (an explicit opt-out, never the silent default).
* The check owns every header named in ``claims_to_headers``: the claim's value overwrites it, and
  when the claim is absent the header is removed, so a client can never pass its own copy on.
* A claim forwarded as a header whose value holds a control character (CR, LF, NUL...) denies the
  request (``invalid_claim``, 401) rather than reaching Envoy.
* A token whose header is malformed (a ``kid`` that is not a string, a bad ``crit``...) is a
  well-formed denial (``invalid_token``), never an exception.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import OrderedDict
from typing import Any

import jwt as pyjwt
from pydantic import ValidationError

from legation.errors import ConfigError
from legation.extauthz._headers import bad_header_value
from legation.extauthz._jwt_config import (
    _FAMILY,
    METADATA_KEY,
    SUPPORTED,
    JwtConfig,
    ProviderConfig,
)
from legation.extauthz.checks import ALLOW, Decision
from legation.extauthz.config import pydantic_error
from legation.extauthz.errors import AuthzError
from legation.extauthz.jwks import KeySet
from legation.extauthz.request import RequestContext, parse_query

__all__ = [
    "METADATA_KEY",
    "SUPPORTED",
    "JwtCheck",
    "JwtCheckFactory",
    "JwtConfig",
    "ProviderConfig",
]


class _Provider:
    def __init__(self, config: ProviderConfig) -> None:
        self.config = config
        self._header = config.from_header.lower() if config.from_header else None
        self._prefix = config.header_prefix.lower()
        self._prefix_len = len(config.header_prefix)
        self.keys = KeySet(
            url=config.jwks_url,
            path=config.jwks_file,
            inline=config.jwks,
            cache_s=config.jwks_cache_s,
            min_refetch_s=config.jwks_min_refetch_s,
            timeout_s=config.jwks_timeout_s,
            max_bytes=config.jwks_max_bytes,
            allow_insecure_http=config.allow_insecure_http,
        )
        self.audiences = None if config.audiences == "any" else config.audiences

    def token(self, ctx: RequestContext) -> str | None:
        c = self.config
        if self._header and (value := ctx.headers.get(self._header)):
            if value[: self._prefix_len].lower() == self._prefix:
                return str(value[self._prefix_len :].strip())
        if c.from_cookie and (cookies := ctx.headers.get("cookie")):
            for part in cookies.split(";"):
                name, _, value = part.strip().partition("=")
                if name == c.from_cookie and value:
                    return str(value)
        if c.from_query and "?" in ctx.path:
            try:
                values = parse_query(ctx.path.partition("?")[2], strict=False).get(c.from_query)
            except ValueError:  # too many parameters
                raise AuthzError(
                    "the query string cannot be parsed", code="malformed_token"
                ) from None
            if values:
                return values[0]
        return None

    async def verify(self, token: str) -> dict[str, Any]:
        c = self.config
        try:
            header = pyjwt.get_unverified_header(token)
        except pyjwt.DecodeError:
            raise AuthzError("the token is not a JWT", code="malformed_token") from None
        except pyjwt.InvalidTokenError as e:  # kid not a string, bad crit...: no traceback
            raise AuthzError(f"the token header is invalid: {e}", code="invalid_token") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in c.algorithms:
            shown = repr(alg[:20]) if isinstance(alg, str) else type(alg).__name__
            raise AuthzError(f"algorithm {shown} is not allowed", code="disallowed_algorithm")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):  # pyjwt checks this today; we rely on it
            raise AuthzError("the token header's kid is not a string", code="invalid_token")
        key = await self.keys.get(kid)
        if key.key_type != _FAMILY[str(alg)[:2]]:
            raise AuthzError(
                f"algorithm {alg} does not fit a {key.key_type} key", code="disallowed_algorithm"
            )
        try:
            return pyjwt.decode(
                token,
                key.key,
                algorithms=[alg],
                issuer=c.issuer,
                audience=self.audiences,
                leeway=c.leeway_s,
                options={
                    "require": ["exp", *c.required_claims],
                    "verify_aud": self.audiences is not None,
                },
            )
        except pyjwt.ExpiredSignatureError:
            raise AuthzError("the token has expired", code="token_expired") from None
        except pyjwt.ImmatureSignatureError:
            raise AuthzError("the token is not valid yet", code="token_not_yet_valid") from None
        except (pyjwt.InvalidAudienceError, pyjwt.MissingRequiredClaimError) as e:
            code = (
                "wrong_audience" if isinstance(e, pyjwt.InvalidAudienceError) else "missing_claim"
            )
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
            raise AuthzError(
                f"the token is invalid: {type(e).__name__}", code="invalid_token"
            ) from None


class JwtCheck:
    name = "jwt"

    def __init__(self, config: JwtConfig) -> None:
        self.config = config
        self.providers = [_Provider(p) for p in config.providers]
        self._by_issuer = {p.config.issuer: p for p in self.providers}
        self._cache: OrderedDict[bytes, tuple[_Provider, dict[str, Any], float]] = OrderedDict()

    async def check(self, ctx: RequestContext) -> Decision:
        try:
            provider, token = self._find(ctx)
            digest = hashlib.sha256(token.encode()).digest()
            hit = self._cache.get(digest)
            if hit is not None and hit[0] is provider and time.time() < hit[2]:
                claims = hit[1]
            else:
                claims = await provider.verify(token)
                self._remember(digest, provider, claims)
            return self._decide(ctx, provider, claims)
        except AuthzError as e:
            if e.is_client_error and e.status is None:
                e.status = 401  # as Envoy's jwt_authn: the client must authenticate (again)
            raise

    def _decide(self, ctx: RequestContext, provider: _Provider, claims: dict[str, Any]) -> Decision:
        """The decision once ``claims`` are verified: kept on ``ctx``, and the provider's
        claims_to_headers / claims_to_metadata."""
        ctx.claims = claims
        ctx.jwt_provider = provider.config.name
        config = provider.config
        if not (config.claims_to_headers or config.claims_to_metadata):
            return ALLOW
        # every header this check owns is set from the claim or removed: never the client's copy
        headers: dict[str, str] = {}
        remove: list[str] = []
        for claim, header in config.claims_to_headers.items():
            if claim not in claims:
                remove.append(header)
                continue
            value = _header_value(claims[claim])
            if bad_header_value(value):
                raise AuthzError(
                    f"claim {claim!r} cannot be a header value (control characters)",
                    code="invalid_claim",
                )
            headers[header] = value
        metadata = {
            METADATA_KEY: {
                c: _header_value(claims[c]) for c in config.claims_to_metadata if c in claims
            }
        }
        return Decision(
            allowed=True,
            headers=headers,
            request_headers_to_remove=tuple(remove),
            dynamic_metadata=metadata if config.claims_to_metadata else {},
        )

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
        except pyjwt.InvalidTokenError as e:
            raise AuthzError(f"the token header is invalid: {e}", code="invalid_token") from None
        found = self._by_issuer.get(issuer) if isinstance(issuer, str) else None
        if found is None:
            raise AuthzError("no provider for the token's issuer", code="wrong_issuer")
        return found, token

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
