"""The rate-limit service as a :class:`~legation.services.base.Service`.

Its block names the envoyproxy/ratelimit YAML (``ratelimit.config``, which must declare the
block's ``domain``) and upstream's service settings, as mesh keys: ``shadow_mode``,
``quota_mode``, ``merge_domains``, ``response_headers`` (names in ``response_header_names``),
``response_dynamic_metadata``, and the memory backend's ``max_keys``/``max_bytes``.

Embedded, the service does not poll its file itself: the control plane watches it with the mesh,
validates an edit like a mesh change (a bad one is reported with file and field, counted, and the
running limits stay), and swaps the new limits and modes into the running limiter. Only the
address, TLS and the counter store (backend and its options) need a restart.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from prometheus_client import CollectorRegistry

from legation.errors import ConfigError
from legation.ratelimit.limiter import ResponseHeaders
from legation.services.base import GrpcServiceParts, Invalid, ServiceSpec, spec_key

if TYPE_CHECKING:
    import grpc

    from legation.config import Mesh
    from legation.grpc_server import TlsSource
    from legation.ratelimit.limiter import RateLimiter


class RateLimitService(GrpcServiceParts):
    kind: ClassVar[str] = "ratelimit"

    @classmethod
    def settings(cls, mesh: Mesh, mesh_dir: Path) -> ServiceSpec:
        from legation.ratelimit.config import load_files

        block = mesh.ratelimit
        assert block is not None and block.config is not None
        path = mesh_dir / block.config
        try:
            loaded = load_files([path], merge_domains=block.merge_domains)
        except ConfigError as err:
            raise Invalid("config", str(err)) from None
        if block.domain not in loaded.domains:
            found = ", ".join(sorted(loaded.domains)) or "none"
            raise Invalid(
                "domain", f"{block.domain!r} is not the domain of {path} (it declares: {found})"
            )
        names = block.response_header_names
        return ServiceSpec(
            kind=cls.kind,
            host=block.host,
            port=block.port,
            restart_key=spec_key(block.host, block.port, block.backend, block.backend_options()),
            live={
                "config_file": str(path),
                "config": loaded,
                "backend": block.backend,
                "backend_options": block.backend_options(),
                "failure_mode": {"open": "allow", "closed": "deny"}.get(
                    block.failure_mode, block.failure_mode
                ),
                "local_instances": block.local_instances,
                "shadow_mode": block.shadow_mode,
                "quota_mode": block.quota_mode,
                "merge_domains": block.merge_domains,
                "response_headers": block.response_headers,
                "header_limit": names.limit,
                "header_remaining": names.remaining,
                "header_reset": names.reset,
                "response_dynamic_metadata": block.response_dynamic_metadata,
            },
            watched=(path,),
        )

    @classmethod
    def references(cls, mesh: Mesh, spec: ServiceSpec) -> list[tuple[str, str]]:
        return []  # descriptors are matched at run time, as upstream does

    def __init__(self, spec: ServiceSpec, *, tls: TlsSource | None) -> None:
        self.spec = spec
        self._tls = tls
        self._registry = CollectorRegistry()
        self.server: grpc.aio.Server | None = None
        self.port = spec.port

    async def start(self) -> int:
        from legation.ratelimit import service

        live = dict(self.spec.live)
        config = live.pop("config")
        # failure_mode local: each worker counts its share of every limit while Redis is away
        live["local_instances"] *= self.spec.workers
        settings = service.Settings(
            host=self.spec.host,
            port=self.spec.bind_port(self.spec.port),
            registry=self._registry,
            tls=self._tls,
            config_files=(live.pop("config_file"),),
            reload_interval=0,
            **live,
        )
        self.server, self.port = await service.start_server(settings, config=config)
        return self.port

    async def apply(self, spec: ServiceSpec) -> None:
        assert self.server is not None
        live = spec.live
        # failure_mode local: each worker counts its share of every limit while Redis is away
        live = {**live, "local_instances": live["local_instances"] * spec.workers}
        swap_live(self.server.legation_limiter, self.server.legation_servicer, live)  # type: ignore[attr-defined]
        self.spec = spec

    @classmethod
    def add_cli_options(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--backend", default="memory", choices=["memory", "redis"], help="counter store"
        )
        parser.add_argument(
            "--redis-url",
            default="redis://127.0.0.1:6379/0",
            help="Redis URL (a password in it is never logged)",
        )
        parser.add_argument("--redis-cluster", action="store_true", help="Redis Cluster")
        parser.add_argument(
            "--failure-mode",
            choices=["allow", "deny", "local"],
            default="allow",
            help="answer while the store is unreachable "
            "(default allow, as Envoy; local: in-memory limits)",
        )
        parser.add_argument(
            "--local-instances",
            type=int,
            default=1,
            help="with --failure-mode local: instances sharing the limits",
        )
        parser.add_argument(
            "--shadow-mode", action="store_true", help="count and report, never limit"
        )

    @classmethod
    async def serve_cli(
        cls, args: argparse.Namespace, *, host: str, port: int, reuse_port: bool
    ) -> tuple[grpc.aio.Server, int, Any]:
        from legation.ratelimit import service

        options: dict[str, Any] = {}
        if args.backend == "redis":
            options = {"url": args.redis_url, "cluster": args.redis_cluster}
        settings = service.Settings(
            host=host,
            port=port,
            reuse_port=reuse_port,
            config_files=(args.config,) if args.config else (),
            backend=args.backend,
            backend_options=options,
            failure_mode=args.failure_mode,
            local_instances=args.local_instances,
            shadow_mode=args.shadow_mode,
        )
        server, bound = await service.start_server(settings)
        return server, bound, server.stop


def swap_live(limiter: RateLimiter, servicer: Any, live: Mapping[str, Any]) -> None:
    """Swap a plan's limits and modes into a running limiter and its servicer (the rate-limit
    service's, or the fused call-out's: :mod:`legation.services._fused`)."""
    limiter.swap(live["config"])
    limiter.shadow_mode = live["shadow_mode"]
    limiter.quota_mode = live["quota_mode"]
    limiter.dynamic_metadata = live["response_dynamic_metadata"]
    limiter.response_headers = (
        ResponseHeaders(
            limit=live["header_limit"],
            remaining=live["header_remaining"],
            reset=live["header_reset"],
        )
        if live["response_headers"]
        else None
    )
    servicer.local_instances = live["local_instances"]
    servicer.failure_mode = live["failure_mode"]
