"""The access-log service as a :class:`~legation.services.base.Service`: Envoy's gRPC access-log
protocol (:mod:`legation.observe.als`) feeding golden metrics (:mod:`legation.observe`).

Its block (``accesslog``, :mod:`legation.config.accesslog`) gives the address and TLS, and which
proxies' JSON access-log lines the service writes itself (``to: service``, swapped live); the
other JSON logs are the proxies' own (the translation). A reload restarts it only when the address
or TLS changed. Its registry carries the golden metrics (``legation_golden_*``,
:mod:`legation.observe.prometheus`) and the service's own counters (``legation_accesslog_*``);
:meth:`AccessLogService.golden` is the snapshot ``/status`` shows.

One process per mesh: the windows and percentiles live in its memory, so the block's ``workers``
is 1 and ``legation serve accesslog`` refuses ``--workers`` above 1 (behind real Envoys one
process spends ~17 us per entry, ~60k entries/s per core; flooded alone it takes ~94k/s,
``bench/golden.py``).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from legation.certs.locate import proxy_identities
from legation.observe.aggregator import Aggregator
from legation.observe.als import AccessLogServicer, start_als_server
from legation.observe.jsonlines import JsonSink
from legation.observe.prometheus import GoldenCollector
from legation.services.base import GrpcServiceParts, ServiceSpec, spec_key

if TYPE_CHECKING:
    import grpc

    from legation.config import Mesh
    from legation.grpc_server import TlsSource

__all__ = ["AccessLogService", "ServiceCollector"]


class ServiceCollector(Collector):
    """The access-log service's own numbers: streams opened, entries received (HTTP and TCP)."""

    def __init__(self, servicer: AccessLogServicer) -> None:
        self.servicer = servicer

    def collect(self) -> Iterator[Metric]:
        s = self.servicer
        entries = CounterMetricFamily(
            "legation_accesslog_entries", "Access-log entries received", labels=["type"]
        )
        entries.add_metric(["http"], s.entries)
        entries.add_metric(["tcp"], s.tcp_entries)
        yield entries
        yield CounterMetricFamily(
            "legation_accesslog_streams", "Access-log streams Envoy opened", value=s.streams
        )
        yield GaugeMetricFamily(
            "legation_accesslog_streams_open", "Access-log streams open now", value=s.open_streams
        )
        yield CounterMetricFamily(
            "legation_accesslog_streams_refused",
            "Access-log streams refused: they named a node their peer's certificate is not",
            value=s.refused,
        )


class AccessLogService(GrpcServiceParts):
    kind: ClassVar[str] = "accesslog"
    one_process: ClassVar[bool] = True
    """``legation serve accesslog --workers N`` is refused (see the module's docstring)."""

    @classmethod
    def settings(cls, mesh: Mesh, mesh_dir: Path) -> ServiceSpec:
        block = mesh.accesslog
        assert block is not None
        json = {
            p.node_id: block.log_of(p.node_id).path_for(p.node_id)
            for p in mesh.proxies()
            if block.log_of(p.node_id).to == "service"
        }
        identities = proxy_identities(mesh) if mesh.mtls.enabled else None
        clusters = {p.node_id: p.node_cluster for p in mesh.proxies()} if identities else None
        return ServiceSpec(
            kind=cls.kind,
            host=block.host,
            port=block.port,
            restart_key=spec_key(block.host, block.port),
            live={"json": json, "identities": identities, "clusters": clusters},
        )

    @classmethod
    def references(cls, mesh: Mesh, spec: ServiceSpec) -> list[tuple[str, str]]:
        return []

    def __init__(self, spec: ServiceSpec, *, tls: TlsSource | None) -> None:
        self.spec = spec
        self._tls = tls
        self.aggregator = Aggregator()
        self.sink = JsonSink(spec.live.get("json", {}))
        self.servicer = AccessLogServicer(self.aggregator, sink=self.sink)
        self._identities(spec)
        self._registry = registry_of(self.servicer)
        self.server: grpc.aio.Server | None = None
        self.port = spec.port

    async def start(self) -> int:
        self.server, self.port = await start_als_server(
            self.servicer, host=self.spec.host, port=self.spec.port, tls=self._tls
        )
        return self.port

    async def apply(self, spec: ServiceSpec) -> None:
        self.sink.swap(spec.live.get("json", {}))  # the proxies whose lines it writes
        self._identities(spec)
        self.spec = spec

    def _identities(self, spec: ServiceSpec) -> None:
        """Which peer may speak for which node: checked only when the service serves mTLS
        (a ``tls: none`` block in an mTLS mesh has no peer certificates to check)."""
        identities = spec.live.get("identities") or {}
        checked = bool(identities) and self._tls is not None
        self.servicer.identities = dict(identities) if checked else None
        self.servicer.clusters = dict(spec.live.get("clusters") or {}) if checked else None

    async def stop(self, grace: float) -> None:
        await super().stop(grace)
        self.sink.close()

    def golden(self) -> dict[str, Any]:
        """The golden metrics now (``Snapshot.to_dict()``), as ``/status`` carries them."""
        return self.aggregator.snapshot().to_dict()

    @classmethod
    def add_cli_options(cls, parser: argparse.ArgumentParser) -> None:
        return None

    @classmethod
    async def serve_cli(
        cls, args: argparse.Namespace, *, host: str, port: int, reuse_port: bool
    ) -> tuple[grpc.aio.Server, int, Any]:
        from prometheus_client import REGISTRY

        servicer = AccessLogServicer(Aggregator())
        REGISTRY.register(GoldenCollector(servicer.aggregator))
        REGISTRY.register(ServiceCollector(servicer))
        server, bound = await start_als_server(servicer, host=host, port=port)
        return server, bound, server.stop


def registry_of(servicer: AccessLogServicer) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(GoldenCollector(servicer.aggregator))
    registry.register(ServiceCollector(servicer))
    return registry
