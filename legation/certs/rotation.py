"""Renewing certificates before they expire, on a timer.

:class:`Rotation` re-issues the mesh's workload certificates (and the embedded services' server
certificates) at 2/3 of their lifetime: a service serves its new one from the next handshake on;
for proxies, ``republish(nodes)`` is called so their snapshots (only their SDS secrets change)
reach Envoy, which swaps certificates without restarting or draining. The timer wakes when the
next certificate is due, when :meth:`Rotation.changed` says new ones were issued, and at least
every ``check_every`` seconds (so a suspended machine catches up).

It also drives a root rotation (:mod:`legation.certs.roots`), looking every ``root_check``
seconds: a rotation requested by ``legation ca rotate-root`` (or left by a control plane that
stopped mid-way) is served at once (both roots in every trust bundle); each next phase begins
only when ``in_sync()`` says every proxy ACKed what the last one published, the phase has lasted
``settle`` seconds (service processes read their certificate files every second: they follow
within it), and, before the old root is retired, the recorded overlap has passed. Every phase
republishes every proxy.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import timedelta

from prometheus_client import CollectorRegistry, Counter

from legation.certs.issuer import MeshIssuer
from legation.certs.roots import Phase

log = logging.getLogger("legation.certs.rotation")

__all__ = ["Rotation"]


class Rotation:
    def __init__(
        self,
        issuer: MeshIssuer,
        *,
        republish: Callable[[list[str]], None],
        registry: CollectorRegistry,
        on_event: Callable[[str], None],
        on_error: Callable[[str], None],
        check_every: float = 60.0,
        in_sync: Callable[[], bool] = lambda: True,
        root_check: float = 1.0,
        settle: float = 5.0,
    ) -> None:
        """``in_sync``: every proxy ACKed the snapshot last published to it (the gate between
        root rotation phases)."""
        self.issuer = issuer
        self.in_sync = in_sync
        self.root_check = root_check
        self.settle = timedelta(seconds=settle)
        self._root_error = ""
        self.republish = republish
        self.on_event = on_event
        self.on_error = on_error
        self.check_every = check_every
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.count = Counter(
            "legation_certificate_rotations",
            "Workload certificates re-issued before expiry",
            registry=registry,
        )
        self.root_phases = Counter(
            "legation_root_rotation_phases",
            "Root rotation phases entered",
            ["phase"],
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

    def step_root(self) -> Phase | None:
        """Serve the root rotation's recorded phase, and enter the next one when its gate is
        open. The phase served after the step (None: no rotation under way)."""
        issuer = self.issuer
        before = issuer.root_phase
        if issuer.reload_roots():
            self._roots_published(before)
        state = issuer.roots.state if issuer.roots else None
        if state is None or not self.in_sync() or issuer.clock() < state.phase_since + self.settle:
            return issuer.root_phase
        if state.phase is Phase.TRUST:
            issuer.advance_root(Phase.ISSUE)
        elif state.phase is Phase.ISSUE and issuer.clock() >= state.phase_since + state.overlap:
            issuer.advance_root(Phase.RETIRE)
        else:
            return state.phase
        self._roots_published(state.phase)
        return issuer.root_phase

    def _roots_published(self, before: Phase | None) -> None:
        issuer = self.issuer
        nodes = sorted(issuer.certs)
        self.republish(nodes)
        self.changed()
        roots = issuer.roots
        phase = issuer.root_phase
        self.root_phases.labels(str(phase or "done")).inc()
        trusted = ", ".join(c.fingerprint[:23] for c in roots.trusted) if roots else ""
        signer = issuer.ca.fingerprint[:23] if issuer.ca else ""
        what = {
            Phase.TRUST: "both roots trusted, certificates still from the old one",
            Phase.ISSUE: "certificates re-issued from the new root, both still trusted",
            None: "old root retired, only the new one trusted",
        }.get(phase, str(phase))
        self.on_event(
            f"root rotation: {what} (signing {signer}..., trusted {trusted}...; "
            f"{len(nodes)} proxies republished; was {before or 'no rotation'})"
        )

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _run(self) -> None:
        while True:
            self._changed.clear()
            due = self.issuer.next_renewal()
            wait = min(self.check_every, self.root_check)
            if due is not None:
                wait = min(wait, max(0.0, (due - self.issuer.clock()).total_seconds()))
            try:
                await asyncio.wait_for(self._changed.wait(), timeout=wait)
                continue  # new certificates, new schedule
            except TimeoutError:
                pass
            try:
                self.step_root()
            except Exception as err:  # a bad record: said in status, the current roots served
                if str(err) != self._root_error:  # once per distinct error, not every second
                    log.warning("root rotation step failed: %s", err)
                    self.on_error(f"root rotation: {err}")
                self._root_error = str(err)
            else:
                self._root_error = ""
            try:
                self.rotate()
            except Exception as err:  # keep the timer alive: expiring certificates are worse
                log.exception("certificate rotation failed")
                self.on_error(f"certificate rotation failed: {err}")
                await asyncio.sleep(self.check_every)
