"""Signing keys for one JWT provider: a JWKS URL (cached, refetched on an unknown ``kid`` at most
once per ``min_refetch_s``), a JWKS file, or an inline JWKS document."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import urllib.request
from pathlib import Path
from typing import Any

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
    ) -> None:
        self.url = url
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
        if self.url is not None and time.monotonic() - self._fetched_at > self.cache_s:
            await self._refresh(force=True)
        key = self._lookup(kid)
        if key is None and self.url is not None:
            await self._refresh(force=False)  # an unknown kid: the issuer may have rotated
            key = self._lookup(kid)
        if key is None:
            raise AuthzError(f"no key with kid {kid!r}", code="unknown_kid")
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
            except (OSError, ValueError, ConfigError) as e:
                log.warning("JWKS fetch from %s failed (keeping %d keys): %s", self.url,
                            len(self._keys), e)

    def _fetch(self) -> Any:
        assert self.url is not None
        with urllib.request.urlopen(self.url, timeout=self.timeout_s) as resp:
            return json.loads(resp.read())
