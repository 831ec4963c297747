"""The request-path services a mesh declares, run in-process next to the control plane.

``legation up`` and ``legation serve xds`` start the mesh's service blocks whose ``embedded`` is
true (the default) as grpc.aio servers on the control plane's event loop, before any Envoy
starts, and stop them after the Envoys. Blocks with ``embedded: false`` describe a service
running elsewhere: only the Envoy side is configured.

:meth:`EmbeddedServices.apply` makes the running services match a validated
:class:`~legation.services.planning.Plan`: it starts what is new, stops what is gone, restarts a
service whose ``restart_key`` changed (address, TLS, counter store) and otherwise swaps the new
settings into the running one (:meth:`~legation.services.base.Service.apply`): ext_proc chains,
the ext_authz config and checks, rate limits and modes, without dropping a call.

With the mesh's mTLS on (and the block's ``tls`` not ``none``), each embedded service serves
mutual TLS: a server certificate for ``spiffe://<trust_domain>/ns/<namespace>/sa/legation-<kind>``
from the mesh CA, and only clients whose certificate chains to that CA (the mesh's proxies) get
through the handshake. The certificate comes from ``tls_source`` (the control plane's
:meth:`~legation.certs.MeshIssuer.service_tls`), asked before every handshake, so renewals need
no restart; turning TLS on or off restarts the service. Each started service has its own
Prometheus registry (:meth:`EmbeddedServices.registries`), served on the control plane's /metrics.
The services' spans go to the mesh's ``tracing`` collector
(:func:`legation.tracing.spans.configure`): over mutual TLS with each service's own certificate
(the same ``tls_source``) when the embedded receiver serves mesh mTLS.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry

from legation.errors import LegationError
from legation.grpc_server import ServerTls, TlsSource
from legation.services.base import Service, ServiceSpec, ServiceStartError
from legation.services.kinds import KINDS
from legation.services.planning import Plan
from legation.tracing import spans

log = logging.getLogger("legation.services")

__all__ = ["EmbeddedServices"]


class EmbeddedServices:
    """The embedded services of the current mesh generation, by kind name."""

    def __init__(
        self,
        *,
        on_event: Callable[[str], None] | None = None,
        tls_source: Callable[[str], ServerTls | None] | None = None,
    ) -> None:
        """``tls_source(kind)``: the certificate a service with ``spec.tls`` serves, asked before
        each handshake (None: keep the current one; none at start: the start fails)."""
        self.on_event = on_event or (lambda line: log.info("%s", line))
        self.tls_source = tls_source
        self.running: dict[str, Service] = {}
        self.remote: dict[str, str] = {}

    async def apply(self, target: Plan) -> list[str]:
        """Make the running services match ``target``. Returns the failures (each also reported
        through ``on_event``); a service that failed to start or to swap is reported, and one
        that failed to start is left stopped."""
        failures = []
        self.remote = dict(target.remote)
        spans.configure(target.tracing, self.tls_source if target.tracing_tls else None)
        for kind in KINDS:
            want, have = target.embedded.get(kind.name), self.running.get(kind.name)
            if have is not None and want is not None and _same_server(have.spec, want):
                try:
                    await have.apply(want)
                except (OSError, RuntimeError, LegationError) as err:
                    failures.append(
                        self._failed(
                            f"cannot apply the new {kind.name} settings "
                            f"(the running ones stay): {err}"
                        )
                    )
                continue
            if have is not None:
                await self._stop(kind.name)
            if want is None:
                continue
            try:
                service = kind.service_class()(want, tls=self._tls(want))
                port = await service.start()
            except (OSError, RuntimeError, LegationError) as err:
                failures.append(
                    self._failed(
                        f"cannot start the embedded {kind.name} service on "
                        f"{want.host}:{want.port}: {err}"
                    )
                )
                continue
            self.running[kind.name] = service
            self.on_event(
                f"{kind.name} service on {want.host}:{port}"
                + (" (restarted)" if have is not None else "")
            )
        return failures

    async def stop(self) -> None:
        for kind in reversed(KINDS):
            if kind.name in self.running:
                await self._stop(kind.name)
        spans.configure(None)  # no service left to record spans (flushes what is queued)

    def registries(self) -> list[CollectorRegistry]:
        return [s.registry for s in self.running.values()]

    def golden(self) -> dict[str, Any] | None:
        """The access-log service's golden metrics (``Snapshot.to_dict()``), None without one.
        Safe from any thread (the aggregator locks)."""
        golden = getattr(self.running.get("accesslog"), "golden", None)
        return golden() if golden is not None else None

    def status(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for name, service in self.running.items():
            spec = service.spec
            out[name] = {
                "embedded": True,
                "address": f"{spec.host}:{service.port}",
                "tls": "mesh" if spec.tls else "none",
                **service.status(),
            }
        for name, address in self.remote.items():
            out[name] = {"embedded": False, "address": address}
        return out

    def _failed(self, message: str) -> str:
        self.on_event(message)
        return message

    def _tls(self, spec: ServiceSpec) -> TlsSource | None:
        if not spec.tls:
            return None
        source = self.tls_source
        if source is None or source(spec.kind) is None:
            raise ServiceStartError(
                f"{spec.kind}: no mesh certificate to serve mTLS with", code="service_start_failed"
            )
        kind = spec.kind
        return lambda: source(kind)

    async def _stop(self, name: str) -> None:
        await self.running.pop(name).stop(0.5)


def _same_server(running: ServiceSpec, wanted: ServiceSpec) -> bool:
    return (running.restart_key, running.tls) == (wanted.restart_key, wanted.tls)
