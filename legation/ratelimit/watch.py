"""Hot reload: poll the config files, swap one immutable config reference, keep the last good one.

No extra dependency: every ``interval`` seconds the files are read (they are small) and hashed; when
the bytes change, those same bytes are parsed (so what is loaded is what was hashed). A config that
fails to load never replaces the running one: the error, which names the file and field, is logged,
``legation_ratelimit_config_reloads_total{result="error"}`` goes up, and the same bytes are not
retried until a file changes again. A file that disappears is an error like any other.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

from legation import _yaml
from legation.errors import ConfigError
from legation.ratelimit.config import RateLimitConfig, load_texts
from legation.ratelimit.metrics import RateLimitMetrics

log = logging.getLogger(__name__)


class ConfigWatcher:
    """Watches ``paths``; calls ``apply(config)`` with each new good config."""

    def __init__(
        self,
        paths: Sequence[str | Path],
        apply: Callable[[RateLimitConfig], None],
        *,
        metrics: RateLimitMetrics,
        interval: float = 1.0,
        merge_domains: bool = False,
    ) -> None:
        self.paths = [str(p) for p in paths]
        self.merge_domains = merge_domains
        self.interval = interval
        self.last_error: str | None = None
        self._apply = apply
        self._metrics = metrics
        self._digest: bytes | None = None
        self._task: asyncio.Task[None] | None = None

    def load(self) -> RateLimitConfig:
        """The initial load: raises :class:`ConfigError` (a bad config must fail the start)."""
        texts, digest = self._read()
        config = load_texts(texts, merge_domains=self.merge_domains)
        self._digest = digest
        self._metrics.config_reloads.labels("success").inc()
        return config

    def check(self) -> bool | None:
        """Poll once: None when nothing changed, True when a new config was applied, False when
        the change failed to load (the running config stays)."""
        try:
            texts, digest = self._read()
        except ConfigError as exc:
            digest = hashlib.sha256(str(exc).encode()).digest()
            if digest == self._digest:
                return None
            self._digest = digest
            return self._failed(exc)
        if digest == self._digest:
            return None
        self._digest = digest
        try:
            config = load_texts(texts, merge_domains=self.merge_domains)
        except ConfigError as exc:
            return self._failed(exc)
        self._apply(config)
        self.last_error = None
        self._metrics.config_reloads.labels("success").inc()
        log.info("rate-limit config reloaded from %s", ", ".join(self.paths))
        return True

    def start(self) -> asyncio.Task[None]:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="ratelimit-watch")
        return self._task

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                self.check()
            except Exception:  # never let the watcher die: the service keeps its config
                log.exception("rate-limit config watcher failed")

    def _failed(self, exc: ConfigError) -> bool:
        self.last_error = str(exc)
        self._metrics.config_reloads.labels("error").inc()
        log.error("rate-limit config reload failed, keeping the running config: %s", exc)
        return False

    def _read(self) -> tuple[list[tuple[str, str]], bytes]:
        texts: list[tuple[str, str]] = []
        h = hashlib.sha256()
        for path in self.paths:
            try:
                data = _yaml.read_bytes(path)  # a file over the size bound is refused unread
            except OSError as exc:
                raise ConfigError(
                    f"{path}: cannot read: {exc.strerror or exc}", code="unreadable"
                ) from None
            h.update(path.encode() + b"\0" + data + b"\0")
            texts.append((path, data.decode("utf-8", "replace")))
        return texts, h.digest()
