"""Signing keys for one JWT provider: a JWKS URL (cached, refetched on an unknown ``kid`` at most
once per ``min_refetch_s``), a JWKS file, or an inline JWKS document.

A JWKS URL is ``https://`` (``http://`` only to a loopback host and only when the provider sets
``allow_insecure_http``; ``file:`` and every other scheme are refused at config time and again
before each fetch, redirects included), and its body is read up to ``max_bytes`` (1 MiB by
default): a larger document is a failed fetch and the keys already held stay in use.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

import jwt

from legation.errors import ConfigError
from legation.extauthz.errors import AuthzError

log = logging.getLogger("legation.extauthz.jwt")


def parse_jwks(document: Any, *, where: str) -> dict[str | None, jwt.PyJWK]:
    """kid -> key; keys pyjwt cannot use are skipped (a JWKS may list encryption keys)."""
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ConfigError(f"{where}: a JWKS is an object with a 'keys' list")
    keys: dict[str | None, jwt.PyJWK] = {}
    for i, raw in enumerate(document["keys"]):
        if not isinstance(raw, dict) or raw.get("use", "sig") != "sig":
            continue
        try:
            keys[raw.get("kid")] = jwt.PyJWK.from_dict(raw)
        except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError) as e:
            log.warning("%s: key %d skipped: %s", where, i, e)
    return keys


def check_jwks_url(url: str, *, allow_insecure_http: bool) -> None:
    """Raise ValueError unless ``url`` is https, or http to a loopback host when allowed."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
    except ValueError as e:
        raise ValueError(f"jwks_url {url!r} is not a URL: {e}") from None
    if parts.scheme == "https" and host:
        return
    if parts.scheme == "http" and host:
        if not _is_loopback(host):
            raise ValueError(
                f"jwks_url {url!r}: http is allowed only to a loopback host; use https"
            )
        if not allow_insecure_http:
            raise ValueError(
                f"jwks_url {url!r}: http needs allow_insecure_http: true (loopback only); use https"
            )
        return
    raise ValueError(f"jwks_url {url!r}: only https URLs are allowed")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _CheckedRedirects(urllib.request.HTTPRedirectHandler):
    """Follows a redirect only to a URL the provider could have named itself."""

    def __init__(self, allow_insecure_http: bool) -> None:
        self.allow_insecure_http = allow_insecure_http

    def redirect_request(
        self, req: Any, fp: IO[bytes], code: int, msg: str, headers: Any, newurl: str
    ) -> Any:
        try:
            check_jwks_url(newurl, allow_insecure_http=self.allow_insecure_http)
        except ValueError as e:
            raise urllib.error.HTTPError(
                newurl, code, f"redirect refused: {e}", headers, fp
            ) from None
        return super().redirect_request(req, fp, code, msg, headers, newurl)


class KeySet:
    def __init__(
        self,
        *,
        url: str | None = None,
        path: Path | None = None,
        inline: dict[str, Any] | None = None,
        cache_s: float = 300.0,
        min_refetch_s: float = 5.0,
        timeout_s: float = 2.0,
        max_bytes: int = 1 << 20,
        allow_insecure_http: bool = False,
    ) -> None:
        if url is not None:
            try:
                check_jwks_url(url, allow_insecure_http=allow_insecure_http)
            except ValueError as e:
                raise ConfigError(str(e)) from None
        self.url = url
        self.max_bytes = max_bytes
        self._opener = urllib.request.build_opener(_CheckedRedirects(allow_insecure_http))
        self.cache_s = cache_s
        self.min_refetch_s = min_refetch_s
        self.timeout_s = timeout_s
        self.fetches = 0
        self._keys: dict[str | None, jwt.PyJWK] = {}
        self._fetched_at = float("-inf")
        self._lock = asyncio.Lock()
        if path is not None:
            try:
                document = json.loads(path.read_text())
            except (OSError, ValueError) as e:
                raise ConfigError(f"jwks_file: {path}: {e}") from None
            self._keys = parse_jwks(document, where=f"jwks_file {path}")
        elif inline is not None:
            self._keys = parse_jwks(inline, where="jwks")

    async def get(self, kid: str | None) -> jwt.PyJWK:
        if kid is not None and not isinstance(kid, str):
            raise AuthzError("the token header's kid is not a string", code="invalid_token")
        if self.url is not None and time.monotonic() - self._fetched_at > self.cache_s:
            await self._refresh(force=True)
        key = self._lookup(kid)
        if key is None and self.url is not None:
            await self._refresh(force=False)  # an unknown kid: the issuer may have rotated
            key = self._lookup(kid)
        if key is None:
            shown = repr(kid[:40]) if kid is not None else "(none)"
            raise AuthzError(f"no key with kid {shown}", code="unknown_kid")
        return key

    def _lookup(self, kid: str | None) -> jwt.PyJWK | None:
        if kid is None and len(self._keys) == 1:
            return next(iter(self._keys.values()))
        return self._keys.get(kid)

    async def _refresh(self, *, force: bool) -> None:
        async with self._lock:
            age = time.monotonic() - self._fetched_at
            if age < self.min_refetch_s or (force and age <= self.cache_s):
                return  # fetched meanwhile, or too recently to hammer the issuer again
            self._fetched_at = time.monotonic()
            self.fetches += 1
            try:
                document = await asyncio.to_thread(self._fetch)
                self._keys = parse_jwks(document, where=f"jwks_url {self.url}")
            except (OSError, ValueError, RecursionError, ConfigError) as e:
                log.warning(
                    "JWKS fetch from %s failed (keeping %d keys): %s", self.url, len(self._keys), e
                )

    def _fetch(self) -> Any:
        assert self.url is not None
        with self._opener.open(self.url, timeout=self.timeout_s) as resp:
            length = resp.headers.get("content-length")
            if length is not None and length.isdigit() and int(length) > self.max_bytes:
                raise ValueError(
                    f"the JWKS is {length} bytes, more than jwks_max_bytes ({self.max_bytes})"
                )
            data = resp.read(self.max_bytes + 1)
            if len(data) > self.max_bytes:
                raise ValueError(f"the JWKS is more than jwks_max_bytes ({self.max_bytes})")
            return json.loads(data)
