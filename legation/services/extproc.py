"""The ext_proc service as a :class:`~legation.services.base.Service`.

Its chains are the mesh routes' ``filters`` (one chain per route, named after it); the block
gives the per-message ``timeout`` and ``stream_idle_timeout``. Everything but the address and
TLS is swapped live on the servicer (:meth:`ExtProcServicer.swap`): a reload changes the chains
for new streams, open ones finish on theirs. The previous generation's chains stay served next to
the new ones, so an Envoy still on the old routes never names an unknown chain.

With ``protocol: http`` the service also serves Envoy's ext_proc HTTP transport on ``http_port``
(:mod:`legation.extproc.http_server`) around the gRPC servicer's own processor: the same chains,
swapped together; with mesh TLS it serves the same certificate and accepts only the mesh's
proxies, as the gRPC server does.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from prometheus_client import CollectorRegistry

from legation.extproc.config import Chains
from legation.extproc.metrics import Metrics
from legation.extproc.service import register
from legation.extproc.servicer import ExtProcServicer
from legation.grpc_server import BindError, start_grpc_server
from legation.services.base import GrpcServiceParts, ServiceSpec, spec_key
from legation.services.chains import route_chains

if TYPE_CHECKING:
    import grpc

    from legation.config import Mesh
    from legation.fastpath._http import Listening
    from legation.grpc_server import TlsSource


class ExtProcService(GrpcServiceParts):
    kind: ClassVar[str] = "extproc"

    @classmethod
    def settings(cls, mesh: Mesh, mesh_dir: Path) -> ServiceSpec:
        block = mesh.extproc
        assert block is not None
        http = {"port": block.http_port} if block.http else None
        return ServiceSpec(
            kind=cls.kind,
            host=block.host,
            port=block.port,
            restart_key=spec_key(block.host, block.port, http),
            live={
                "chains": route_chains(mesh),
                "message_timeout": block.timeout.total_seconds(),
                "stream_idle_timeout": block.stream_idle_timeout.total_seconds(),
                "http": http,
            },
        )

    @classmethod
    def references(cls, mesh: Mesh, spec: ServiceSpec) -> list[tuple[str, str]]:
        return []  # filters are validated by their plugins when the mesh loads

    def __init__(self, spec: ServiceSpec, *, tls: TlsSource | None) -> None:
        self.spec = spec
        self._tls = tls
        self._registry = CollectorRegistry()
        self._metrics = Metrics(self._registry)
        self._chains: Chains = spec.live["chains"]
        self.servicer = ExtProcServicer(
            self._chains,
            metrics=self._metrics,
            message_timeout=float(spec.live["message_timeout"]),
            stream_idle_timeout=float(spec.live["stream_idle_timeout"]),
        )
        self.server: grpc.aio.Server | None = None
        self.http: Listening | None = None
        self.port = spec.port

    async def start(self) -> int:
        servicer = self.servicer
        self.server, self.port = await start_grpc_server(
            "extproc",
            lambda s: register(servicer, s),
            host=self.spec.host,
            port=self.spec.bind_port(self.spec.port),
            tls=self._tls,
        )
        http = self.spec.live.get("http")
        if http is not None:
            from legation.extproc.http_server import HttpSettings, serve_http

            port = self.spec.bind_port(http["port"])
            settings = HttpSettings(host=self.spec.host, port=port, tls=self._tls)
            try:
                self.http = await serve_http(servicer.processor, settings)
            except OSError as err:
                await self.server.stop(0)
                self.server = None
                raise BindError(
                    f"extproc: cannot listen on {self.spec.host}:{port} (http_port): "
                    f"{err.strerror or err}"
                ) from None
        return self.port

    async def stop(self, grace: float) -> None:
        if self.http is not None:
            await self.http.close()
            self.http = None
        await super().stop(grace)

    def status(self) -> dict[str, Any]:
        return {"http_port": self.http.port} if self.http is not None else {}

    async def apply(self, spec: ServiceSpec) -> None:
        chains: Chains = spec.live["chains"]
        served = Chains(chains={**self._chains.chains, **chains.chains}, default=chains.default)
        self.servicer.swap(
            served,
            message_timeout=float(spec.live["message_timeout"]),
            stream_idle_timeout=float(spec.live["stream_idle_timeout"]),
        )
        self._chains, self.spec = chains, spec

    @classmethod
    def add_cli_options(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--message-timeout",
            type=float,
            default=0.2,
            help="seconds a phase may take (Envoy's message_timeout)",
        )
        parser.add_argument(
            "--stream-idle-timeout",
            type=float,
            default=300.0,
            help="seconds a stream may stay silent before it is ended",
        )
        parser.add_argument(
            "--http-port",
            type=int,
            default=None,
            help="also serve Envoy's ext_proc HTTP transport (http_service, work-in-progress in "
            "Envoy) on this port (worker i: + 100 i), POST /ext_proc/<chain>",
        )

    @classmethod
    async def serve_cli(
        cls, args: argparse.Namespace, *, host: str, port: int, reuse_port: bool
    ) -> tuple[grpc.aio.Server, int, Any]:
        from legation.extproc import service

        settings = service.Settings(
            host=host,
            port=port,
            reuse_port=reuse_port,
            config_file=Path(args.config) if args.config else None,
            message_timeout=args.message_timeout,
            stream_idle_timeout=args.stream_idle_timeout,
        )
        server, bound = await service.start_server(settings)
        if args.http_port is None:
            return server, bound, server.stop
        from legation.extproc.http_server import HttpSettings, serve_http

        base = int((args.listen or ":0").rpartition(":")[2] or 0)
        http_port = args.http_port + (port - base if base and not reuse_port else 0)
        try:
            http = await serve_http(
                service.servicer_of(server).processor,
                HttpSettings(host=host, port=http_port, reuse_port=reuse_port),
            )
        except OSError as err:
            await server.stop(0)
            raise BindError(
                f"extproc: cannot listen on {host}:{http_port} (--http-port): {err.strerror or err}"
            ) from None
        # one write per line: workers share stdout, and print's two writes may interleave
        sys.stdout.write(f"extproc HTTP transport on {host}:{http.port}\n")
        sys.stdout.flush()

        async def stop(grace: float) -> None:
            await http.close()
            await server.stop(grace)

        return server, bound, stop
