"""Renewing certificates before they expire, on a timer.

:class:`Rotation` re-issues the mesh's workload certificates (and the embedded services' server
certificates) at 2/3 of their lifetime: a service serves its new one from the next handshake on;
for proxies, ``republish(nodes)`` is called so their snapshots (only their SDS secrets change)
reach Envoy, which swaps certificates without restarting or draining. The timer wakes when the
next certificate is due, when :meth:`Rotation.changed` says new ones were issued, and at least
every ``check_every`` seconds (so a suspended machine catches up).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter

from legation.certs.issuer import MeshIssuer

log = logging.getLogger("legation.certs.rotation")

__all__ = ["Rotation"]


class Rotation:
    def __init__(self, issuer: MeshIssuer, *, republish: Callable[[list[str]], None],
                 registry: CollectorRegistry, on_event: Callable[[str], None],
                 on_error: Callable[[str], None], check_every: float = 60.0) -> None:
        self.issuer = issuer
        self.republish = republish
        self.on_event = on_event
        self.on_error = on_error
        self.check_every = check_every
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.count = Counter(
            "legation_certificate_rotations", "Workload certificates re-issued before expiry",
            registry=registry,
        )

    def changed(self) -> None:
        """New certificates were issued: recompute when the next one is due."""
        self._changed.set()

    def rotate(self, *, force: bool = False) -> list[str]:
        """Re-issue the certificates due for renewal (all with ``force``); the proxies' node ids
        (whose snapshots were republished)."""
        kinds = self.issuer.rotate_services(force=force)  # served from the next handshake on
        if kinds:
            self.count.inc(len(kinds))
            self.changed()
            self.on_event(f"certificates renewed for services: {', '.join(kinds)}")
        nodes = self.issuer.rotate(force=force)
        if not nodes:
            return nodes
        self.republish(nodes)
        self.count.inc(len(nodes))
        self.changed()
        self.on_event(f"certificates renewed for {len(nodes)} proxies")
        return nodes

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _run(self) -> None:
        while True:
            self._changed.clear()
            due = self.issuer.next_renewal()
            wait = self.check_every
            if due is not None:
                wait = min(wait, max(0.0, (due - self.issuer.clock()).total_seconds()))
            try:
                await asyncio.wait_for(self._changed.wait(), timeout=wait)
                continue  # new certificates, new schedule
            except TimeoutError:
                pass
            try:
                self.rotate()
            except Exception as err:  # keep the timer alive: expiring certificates are worse
                log.exception("certificate rotation failed")
                self.on_error(f"certificate rotation failed: {err}")
                await asyncio.sleep(self.check_every)
