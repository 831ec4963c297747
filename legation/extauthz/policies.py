"""Rego sources on disk -> a validated policy version, and the hot reload that swaps it.

A directory of ``*.rego`` modules (and ``data.json`` / ``data.yaml`` base documents, each placed
at its directory's path as OPA places a bundle's data: ``roles/data.json`` is ``data.roles``) is
read once per version and
loaded into OPA's engine in a short-lived evaluator process (:func:`~legation.extauthz.evaluator.
validate`): a module that does not parse, does not type-check (a function the engine does not
know, with its file and line) or crashes the engine is refused before it can serve. The version
that passes is evaluated by an :class:`~legation.extauthz.evaluator.EvaluatorPool` of processes
loaded with exactly the text that was validated.

The running :class:`CompiledPolicies` is an immutable reference that :class:`PolicyStore` swaps,
with its pool. A directory that fails to load never replaces it: the error is logged and counted.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from pathlib import Path

from legation.errors import ConfigError
from legation.extauthz._sources import (
    NETWORK_BUILTINS,
    CompiledPolicies,
    Sources,
    analyse,
    data_files,
    fingerprint,
    is_test_file,
    load,
    package_of,
    read_sources,
    refuse_network,
    sources,
)
from legation.extauthz.evaluator import EvaluatorPool

__all__ = [
    "NETWORK_BUILTINS",
    "CompiledPolicies",
    "PolicyStore",
    "Sources",
    "analyse",
    "data_files",
    "fingerprint",
    "is_test_file",
    "load",
    "package_of",
    "read_sources",
    "refuse_network",
    "sources",
]

log = logging.getLogger("legation.extauthz.policies")


class PolicyStore:
    """Holds the running policy version and its evaluator pool, and swaps both when the
    directory changes. The first version is validated at construction (bad policies fail at
    start); its pool starts with :meth:`start` (or the first :meth:`pool` call)."""

    def __init__(
        self,
        directory: Path,
        *,
        rules: Iterable[str],
        interval_s: float,
        probe_timeout_s: float = 10.0,
        tests: bool = False,
        evaluators: int = 2,
        allow_network: bool = False,
        evaluator_memory_mb: int = 1024,
    ) -> None:
        self.directory = directory
        self.tests = tests
        self.rules = tuple(rules)
        self.interval_s = interval_s
        self.probe_timeout_s = probe_timeout_s
        self.evaluators = evaluators
        self.allow_network = allow_network
        self.evaluator_memory_mb = evaluator_memory_mb
        self.failed_reloads = 0
        self._settling: str | None = None  # a new fingerprint seen once, loaded when it holds
        self.last_error: str | None = None
        self._fingerprint = fingerprint(directory)
        self.current = load(
            directory,
            rules=self.rules,
            probe_timeout_s=probe_timeout_s,
            tests=tests,
            allow_network=allow_network,
        )
        self._pool: EvaluatorPool | None = None
        self._starting: asyncio.Task[EvaluatorPool] | None = None
        self._retired: dict[EvaluatorPool, asyncio.Task[None]] = {}
        self._task: asyncio.Task[None] | None = None

    def _new_pool(self, compiled: CompiledPolicies) -> EvaluatorPool:
        return EvaluatorPool(
            compiled.sources.modules,
            compiled.sources.data,
            size=self.evaluators,
            load_timeout_s=self.probe_timeout_s,
            memory_mb=self.evaluator_memory_mb,
        )

    async def pool(self) -> EvaluatorPool:
        """The running version's pool, started on first use."""
        if self._pool is not None:
            return self._pool
        if self._starting is None:
            self._starting = asyncio.get_running_loop().create_task(
                self._new_pool(self.current).start()
            )
        try:
            pool = await asyncio.shield(self._starting)
        except BaseException:
            if self._starting.done():
                self._starting = None
            raise
        if self._pool is None:
            self._pool = pool
        return self._pool

    async def reload(self, *, settle: bool = False) -> bool:
        """Reload if the directory changed; True when a new version was swapped in.

        ``settle`` (the watcher): a change is loaded only once the directory has looked the
        same on two polls in a row, so a file still being written is not read half-way (a
        truncated policy can be a more permissive one). A version that does not validate is
        not tried again until the files change; one whose evaluators could not start (a
        timeout, no memory, no processes) is retried on the next poll."""
        fp = fingerprint(self.directory)
        if fp == self._fingerprint:
            self._settling = None
            return False
        if settle and fp != self._settling:
            self._settling = fp
            return False
        self._settling = None
        try:
            compiled = await asyncio.to_thread(
                load,
                self.directory,
                rules=self.rules,
                probe_timeout_s=self.probe_timeout_s,
                tests=self.tests,
                allow_network=self.allow_network,
            )
        except ConfigError as e:
            self._fingerprint = fp  # the same files would fail the same way
            return self._failed(str(e))
        try:
            pool = await self._new_pool(compiled).start() if self._pool is not None else None
        except (ConfigError, OSError, TimeoutError) as e:
            return self._failed(f"policy evaluators did not start: {e or type(e).__name__}")
        self._fingerprint = fp
        if compiled.version != self.current.version:
            log.info("policies reloaded: %s -> %s", self.current.version, compiled.version)
        old = self._pool
        if old is None and self._starting is not None:  # a pool for the old version, starting
            self._starting.cancel()
        self.current, self._pool = compiled, pool
        self._starting = None
        if old is not None:  # in-flight evaluations may finish on the old version
            task = asyncio.get_running_loop().create_task(old.close(grace_s=5.0))
            self._retired[old] = task
            task.add_done_callback(lambda _: self._retired.pop(old, None))
        self.last_error = None
        return True

    def _failed(self, message: str) -> bool:
        self.failed_reloads += 1
        self.last_error = message
        log.error("policy reload failed, keeping version %s: %s", self.current.version, message)
        return False

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.reload(settle=True)
            except Exception:  # a watcher must survive anything the filesystem does
                log.exception("policy watcher error")

    async def start(self) -> None:
        """Start the evaluator pool (raises ConfigError if it cannot load) and the watcher."""
        await self.pool()
        if self._task is None and self.interval_s > 0:
            self._task = asyncio.get_running_loop().create_task(self._watch())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        if self._starting is not None and not self._starting.done():
            self._starting.cancel()
        pools = [self._pool] if self._pool is not None else []
        self._pool, self._starting = None, None
        for pool, task in list(self._retired.items()):
            task.cancel()
            pools.append(pool)
        for pool in pools:
            await pool.close()
