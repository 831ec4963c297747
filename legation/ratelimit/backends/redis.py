"""Counters in Redis (standalone or Cluster) through redis asyncio.

* One round trip per request: the hits of a request go out as one non-transactional pipeline of
  ``EVALSHA`` calls (:mod:`._lua`, each atomic on its own key). On a Cluster the pipeline is split
  per node and sent in parallel, so it is one round trip per node involved, concurrently.
* Keys expire (window end, or bucket full, plus a second of slack).
* Short timeouts: every call is bounded by ``timeout_ms`` as a whole (no client-side retries), and
  a miss raises :class:`RateLimitError` ``backend_unavailable`` for the servicer's failure mode.
* A local cache of counters already over their limit answers without Redis until the earliest time
  the hit could pass (``local_cache_size`` entries; 0 turns it off). Hits answered from it are not
  counted in Redis, as in envoyproxy/ratelimit.

Options: ``url`` (``redis://[:password@]host:port/db``, or ``rediss://``; required), ``cluster``
(bool), ``timeout_ms`` (default 100), ``key_prefix`` (default ``legation_rl:``),
``local_cache_size`` (default 100000), ``max_connections`` (default 64). The URL may hold a
password: it is never logged nor shown in errors or reprs (see :attr:`RedisConfig.redacted_url`).
"""

from __future__ import annotations

import asyncio
import hashlib
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError
from redis.retry import Retry

from legation.errors import ConfigError
from legation.ratelimit import algorithms as alg
from legation.ratelimit.algorithms import Decision, Hit
from legation.ratelimit.backends._lua import SCRIPT
from legation.ratelimit.config import Algorithm
from legation.ratelimit.errors import RateLimitError

_SHA = hashlib.sha1(SCRIPT.encode()).hexdigest()
_ALGO = {Algorithm.FIXED_WINDOW: "f", Algorithm.SLIDING_WINDOW: "s", Algorithm.TOKEN_BUCKET: "t"}


@dataclass(frozen=True, slots=True, kw_only=True)
class RedisConfig:
    url: str = field(repr=False)
    cluster: bool = False
    timeout_ms: int = 100
    key_prefix: str = "legation_rl:"
    local_cache_size: int = 100_000
    max_connections: int = 64

    @property
    def redacted_url(self) -> str:
        parts = urllib.parse.urlsplit(self.url)
        if parts.password is None:
            return self.url
        netloc = f"{parts.username or ''}:***@{parts.hostname}"
        if parts.port:
            netloc += f":{parts.port}"
        return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


class RedisBackend:
    """See the module docstring. ``round_trips`` counts pipelines sent (for the benchmark),
    ``available`` is the store's state as the last call found it (a metric)."""

    def __init__(self, config: RedisConfig) -> None:
        self.config = config
        self.round_trips = 0
        self.cache_hits = 0
        self.available = True
        """Whether the last call got its answers (False from a failure until the next answer)."""
        self._over: dict[str, tuple[int, int]] = {}  # key -> (retry at, reset at), in ms
        timeout = config.timeout_ms / 1000
        common: dict[str, Any] = {
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
            "retry": Retry(NoBackoff(), 0),
            "max_connections": config.max_connections,
        }
        self._client: Redis | RedisCluster
        if config.cluster:
            self._client = RedisCluster.from_url(config.url, **common)
        else:
            self._client = Redis.from_url(config.url, **common)

    def __repr__(self) -> str:
        return f"RedisBackend({self.config.redacted_url!r}, cluster={self.config.cluster})"

    async def hit(self, hits: Sequence[Hit], now_ms: int) -> list[Decision]:
        decisions: list[Decision | None] = [None] * len(hits)
        pending: list[tuple[int, Hit, str, list[Any]]] = []
        for i, h in enumerate(hits):
            refused = self.cached_refusal(h.key, now_ms)
            if refused is not None:
                self.cache_hits += 1
                decisions[i] = refused
                continue
            pending.append((i, h, *self._command(h, now_ms)))
        if pending:
            try:
                async with asyncio.timeout(self.config.timeout_ms / 1000):  # no extra task
                    replies = await self._run(pending)
                self.available = True
            except (RedisError, OSError, TimeoutError) as exc:
                self.available = False
                raise RateLimitError(
                    f"redis {self.config.redacted_url}: {type(exc).__name__}: "
                    f"{_safe(exc, self.config.url)}",
                    code="backend_unavailable",
                ) from None
            for (i, h, _, _), reply in zip(pending, replies, strict=True):
                decision = self._decide(h, now_ms, reply)
                decisions[i] = decision
                if not decision.allowed and decision.retry_ms > 0:
                    self._remember(h.key, now_ms, decision)
        return decisions  # type: ignore[return-value]

    async def close(self) -> None:
        await self._client.aclose()

    def cached_refusal(self, key: str, now_ms: int) -> Decision | None:
        """The refusal the over-limit cache holds for ``key`` at ``now_ms``, if any (no I/O; the
        local failure mode asks it too, so a counter Redis had over stays refused in memory)."""
        cached = self._over.get(key) if self.config.local_cache_size else None
        if cached is None or cached[0] <= now_ms:
            return None
        return Decision(False, 0, max(0, cached[1] - now_ms), cached[0] - now_ms)

    def _command(self, h: Hit, now_ms: int) -> tuple[str, list[Any]]:
        limit = h.limit
        w = limit.window_ms
        key = self.config.key_prefix + h.key
        args: list[Any] = [_ALGO[limit.algorithm], now_ms, w, limit.requests_per_unit, h.cost]
        start = alg.window_start(now_ms, w)
        if limit.algorithm is Algorithm.FIXED_WINDOW:
            key = f"{key}:{start}"
            args.append(start + w - now_ms + 1000)
        elif limit.algorithm is Algorithm.SLIDING_WINDOW:
            idx = start // w
            args += [2 * w - (now_ms - start) + 1000, idx, idx - 1, idx - 2]
        else:
            args.append(0)
        return key, args

    async def _run(self, pending: list[tuple[int, Hit, str, list[Any]]]) -> list[Any]:
        self.round_trips += 1
        try:
            return await self._pipeline(pending)
        except NoScriptError:  # a restarted or flushed Redis: load once, then retry once
            await self._client.script_load(SCRIPT)
            self.round_trips += 2
            return await self._pipeline(pending)

    async def _pipeline(self, pending: list[tuple[int, Hit, str, list[Any]]]) -> list[Any]:
        pipe = (
            self._client.pipeline(transaction=False)
            if not self.config.cluster
            else self._client.pipeline()
        )
        for _, _, key, args in pending:
            pipe.execute_command("EVALSHA", _SHA, 1, key, *args)
        return await pipe.execute()  # type: ignore[no-any-return]

    def _decide(self, h: Hit, now_ms: int, reply: list[int]) -> Decision:
        limit = h.limit
        if limit.algorithm is Algorithm.FIXED_WINDOW:
            return alg.fixed_window(limit, now_ms, h.cost, int(reply[0]))
        if limit.algorithm is Algorithm.SLIDING_WINDOW:
            allowed, prev, cur = (int(x) for x in reply)
            return alg.sliding_window(limit, now_ms, h.cost, prev, cur, bool(allowed))
        return alg.token_bucket(limit, h.cost, int(reply[1]), bool(int(reply[0])))

    def _remember(self, key: str, now_ms: int, decision: Decision) -> None:
        if len(self._over) >= self.config.local_cache_size:
            for k in [k for k, (until, _) in self._over.items() if until <= now_ms]:
                del self._over[k]
            if len(self._over) >= self.config.local_cache_size:
                self._over.clear()
        self._over[key] = (now_ms + decision.retry_ms, now_ms + decision.reset_ms)


def _safe(exc: BaseException, url: str) -> str:
    """The exception text without the URL's password, should redis-py have echoed it."""
    text = str(exc) or "no answer in time"
    password = urllib.parse.urlsplit(url).password
    return text.replace(password, "***") if password else text


class RedisBackendFactory:
    name = "redis"
    _INTS: ClassVar[dict[str, int]] = {"timeout_ms": 1, "local_cache_size": 0, "max_connections": 1}

    def validate(self, raw: Mapping[str, Any]) -> RedisConfig:
        where = "ratelimit backend redis"
        allowed = {"url", "cluster", "key_prefix", *self._INTS}
        for key in raw:
            if key not in allowed:
                raise ConfigError(f"{where}: unknown option {key!r}", code="unknown_key")
        url = raw.get("url")
        if not isinstance(url, str) or urllib.parse.urlsplit(url).scheme not in ("redis", "rediss"):
            raise ConfigError(
                f"{where}: url: expected redis://host:port[/db] or rediss://...", code="invalid_url"
            )
        values: dict[str, Any] = {"url": url}
        for name, minimum in self._INTS.items():
            if name in raw:
                v = raw[name]
                if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
                    raise ConfigError(
                        f"{where}: {name}: expected an integer >= {minimum}, got {v!r}",
                        code="invalid_type",
                    )
                values[name] = v
        if "cluster" in raw:
            if not isinstance(raw["cluster"], bool):
                raise ConfigError(f"{where}: cluster: expected a boolean", code="invalid_type")
            values["cluster"] = raw["cluster"]
        if "key_prefix" in raw:
            if not isinstance(raw["key_prefix"], str):
                raise ConfigError(f"{where}: key_prefix: expected a string", code="invalid_type")
            values["key_prefix"] = raw["key_prefix"]
        return RedisConfig(**values)

    def create(self, config: RedisConfig) -> RedisBackend:
        return RedisBackend(config)
