"""The control plane's small HTTP endpoint, on aiohttp: ``/status`` (JSON, what ``legation
status`` and ``legation top`` print; ``golden`` holds the golden metrics, None without an
access-log service or with ``?golden=0``), ``/metrics`` (Prometheus text of the given
registries), ``/traces`` (the embedded trace receiver's traces, what ``legation traces``
prints) and ``/healthz``.

It only reads: the status document (:func:`status_document`, built from the control plane) and
the registries come from callables, so it holds no state of its own. Paths match by prefix
(``/status?x`` and ``/status/`` answer too); a request that is not HTTP gets aiohttp's 400; every
answer closes its connection.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest

from legation.config.tracing import tracing_tls
from legation.xds.types import ResourceType

if TYPE_CHECKING:
    from legation.config.proxies import ProxySpec
    from legation.controlplane import ControlPlane

__all__ = ["StatusEndpoint", "status_document"]


class StatusEndpoint:
    def __init__(
        self,
        *,
        status: Callable[[], dict[str, Any]],
        registries: Callable[[], Iterable[CollectorRegistry]],
        more_metrics: Callable[[], bytes] | None = None,
        golden: Callable[[], dict[str, Any] | None] | None = None,
        traces: Callable[[Mapping[str, str]], tuple[int, dict[str, Any]]] | None = None,
    ) -> None:
        """``more_metrics``: Prometheus text gathered elsewhere (the service processes'),
        appended to ``/metrics``; ``golden``: the golden metrics (the access-log service's
        snapshot), ``/status``'s ``golden``. Both are called on a thread and may block briefly.
        ``traces``: the query string's parameters -> (HTTP status, JSON document) for
        ``/traces``."""
        self._traces = traces
        self._status = status
        self._registries = registries
        self._more_metrics = more_metrics
        self._golden = golden
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def start(self, host: str, port: int) -> int:
        """Listen on ``host:port`` (0: an ephemeral port); the bound port. Raises OSError when
        the port cannot be bound."""
        app = web.Application()
        app.router.add_route("GET", "/{tail:.*}", self._handle)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = int(runner.addresses[0][1])
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _handle(self, request: web.Request) -> web.Response:
        if request.path.startswith("/status"):
            doc = self._status()
            golden = self._golden if request.query.get("golden") != "0" else None
            doc["golden"] = await asyncio.to_thread(golden) if golden is not None else None
            response = web.Response(body=json.dumps(doc).encode(), content_type="application/json")
            response.force_close()
            return response
        if request.path.startswith("/traces") and self._traces is not None:
            code, document = self._traces(request.query)
            response = web.Response(
                status=code, body=json.dumps(document).encode(), content_type="application/json"
            )
        else:
            response = self._answer(request.path)
        if request.path.startswith("/metrics") and self._more_metrics is not None:
            more = await asyncio.to_thread(self._more_metrics)
            response = web.Response(
                body=response.body + more,  # type: ignore[operator]
                headers={"content-type": response.content_type + "; version=0.0.4; charset=utf-8"},
            )
        response.force_close()  # one request per connection, as `legation status` makes
        return response

    def _answer(self, path: str) -> web.Response:
        if path.startswith("/metrics"):
            body = b"".join(generate_latest(r) for r in self._registries())
            return web.Response(
                body=body, headers={"content-type": "text/plain; version=0.0.4; charset=utf-8"}
            )
        if path.startswith("/healthz"):
            return web.Response(text="ok\n")
        return web.Response(status=404, text="not found\n")


def _admin_host(cp: ControlPlane, spec: ProxySpec) -> str:
    """Where a proxy's admin listens: a captured sidecar's on its pod's address."""
    capture = cp.mesh.capture if cp.mesh else None
    if capture is None or spec.kind != "sidecar" or spec.instance is None:
        return "127.0.0.1"
    return capture.instance_ip(spec.instance)


def status_document(cp: ControlPlane) -> dict[str, Any]:
    """The control plane's state as ``/status`` serves it: the mesh and generation, the last
    rejected change, the services, mTLS, and per proxy its expected and ACKed versions."""
    proxies = []
    for spec in cp.mesh.proxies() if cp.mesh else []:
        node = cp.cache.status.get(spec.node_id)
        snap = cp.snapshots.get(spec.node_id)
        entry: dict[str, Any] = {
            "node_id": spec.node_id,
            "kind": spec.kind,
            "cluster": spec.node_cluster,
            "service": spec.service,
            "admin": f"{_admin_host(cp, spec)}:{spec.admin_port}",
            "listeners": {ls.name: f"{ls.host}:{ls.port}" for ls in spec.listeners},
            "expected": {
                t.short: snap.version(t) for t in ResourceType if snap and snap.resources(t)
            },
        }
        entry.update(
            node.as_dict()
            if node
            else {"connected": False, "acked": {}, "last_nack": None, "nacks": 0}
        )
        entry["in_sync"] = all(entry["acked"].get(t) == v for t, v in entry["expected"].items())
        cert = cp.issuer.certs.get(spec.node_id) if cp.issuer.enabled else None
        if cert is not None:
            entry["certificate"] = cert.summary()
        proxies.append(entry)
    return {
        "mesh": str(cp.mesh_path),
        "generation": cp.generation,
        "mesh_digest": cp._digest,
        "xds": cp.server.address if cp.server else None,
        "last_error": cp.last_error,
        "services": cp.services.status(),
        "processes": _processes(cp),
        "mtls": _mtls_status(cp),
        "tracing": _tracing_status(cp),
        "proxies": proxies,
    }


def _tracing_status(cp: ControlPlane) -> dict[str, Any] | None:
    t = cp.mesh.tracing if cp.mesh else None
    if t is None:
        return None
    store = cp.collector.store
    host, port = t.address()
    return {
        "collector": t.collector,
        "address": f"{host}:{port}",
        "sampling": t.sampling,
        "tls": "mesh" if cp.mesh is not None and tracing_tls(cp.mesh) else "none",
        "refused": cp.collector.refused,
        "store": store.stats() if store is not None else None,
    }


def _processes(cp: ControlPlane) -> list[dict[str, Any]]:
    """The Legation processes serving this mesh: what ``legation up`` supervises (its
    processes file: role, PID, restarts), else this one process."""
    if cp.processes_file is not None:
        try:
            listed = json.loads(cp.processes_file.read_text())
            if isinstance(listed, list):
                return listed
        except (OSError, ValueError):
            pass
    return [{"role": "xds", "pid": os.getpid(), "restarts": 0, "alive": True}]


def _mtls_status(cp: ControlPlane) -> dict[str, Any] | None:
    status = cp.issuer.status()
    if status is None or cp.mesh is None:
        return None
    return {
        "mode": cp.mesh.mtls.mode,
        "trust_domain": cp.mesh.mtls.trust_domain,
        "ca": status["ca"],
        "services": status["services"],
    }
