"""The ext_authz service as a :class:`~legation.services.base.Service`.

Its block names the service's YAML (``extauthz.config``, relative to the mesh file; the paths in
it relative to its own folder). Planning validates that file and every route's ``authz``
reference against the packages the policy directories of its ``rego`` checks declare, so a
misspelt policy is a ``legation check`` error instead of a 403 on every request. Both the file
and the policy directories are watched: an edit re-runs the validation and, when valid, the new
config is swapped into the running servicer (new checks started first, old ones closed after a
grace period), no restart. The rego check also reloads its policy directory by itself.

With ``protocol: http`` the service also serves Envoy's ext_authz HTTP mode on ``http_port``
(:mod:`legation.fastpath`), around the gRPC server's own servicer: the same checks, and a swapped
config applies to both from the next call; with mesh TLS it serves the same certificate
(renewals followed per handshake) and accepts only the mesh's proxies, as the gRPC server does.
Its forwarded headers come from the same :func:`~legation.translate._authz.authz_callout`
the proxies' filter is built from.
"""

from __future__ import annotations

import argparse
import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from prometheus_client import CollectorRegistry

from legation import _yaml
from legation.config.extensions import worker_socket
from legation.errors import ConfigError
from legation.extauthz.config import LoadedConfig, load_mapping, resolve_paths
from legation.grpc_server import BindError
from legation.services.base import Invalid, ServiceSpec, spec_key

if TYPE_CHECKING:
    import grpc

    from legation.config import Mesh
    from legation.fastpath.fused import FusedDecider
    from legation.fastpath.server import CalloutServer
    from legation.grpc_server import TlsSource


class AuthzService:
    kind: ClassVar[str] = "extauthz"

    @classmethod
    def settings(cls, mesh: Mesh, mesh_dir: Path) -> ServiceSpec:
        block = mesh.extauthz
        assert block is not None and block.config is not None
        path = mesh_dir / block.config
        try:
            raw = _yaml.load_file(path) or {}
        except OSError as err:
            raise Invalid("config", f"cannot read {path}: {err.strerror or err}") from None
        except _yaml.YamlError as err:
            raise Invalid("config", str(err)) from None
        raw = resolve_paths(raw, path.resolve().parent)
        try:
            loaded = load_mapping(raw, source=str(path))
        except ConfigError as err:
            raise Invalid("config", str(err)) from None
        live: dict[str, Any] = {"config": raw, "source": str(path), "loaded": loaded}
        restart_key = spec_key(block.host, block.port)
        if block.http:
            from legation.services._fused import fused_live, restart_parts
            from legation.translate._authz import authz_callout

            callout = authz_callout(block, mesh)
            live["http"] = {
                "port": block.http_port,
                "socket": block.http_socket,
                "upstream_headers": list(callout.upstream_headers),
                "client_headers": list(callout.client_headers),
            }
            live["fused"] = fused_live(mesh, mesh_dir)
            restart_key = spec_key(
                block.host, block.port, live["http"], restart_parts(live["fused"])
            )
        return ServiceSpec(
            kind=cls.kind,
            host=block.host,
            port=block.port,
            restart_key=restart_key,
            live=live,
            watched=(path, *(Path(rego.policy_dir) for rego in _regos(loaded))),
        )

    @classmethod
    def references(cls, mesh: Mesh, spec: ServiceSpec) -> list[tuple[str, str]]:
        from legation.extauthz.rego import entrypoint

        regos = _regos(spec.live["loaded"])
        asked = [
            (i, r.authz)
            for i, r in enumerate(mesh.routes)
            if r.authz is not None and r.authz != "disabled"
        ]
        if not regos or not asked:
            return []  # no rego check: a route's policy name reaches no engine
        known: list[tuple[Any, frozenset[str]]] = []
        for rego in regos:
            try:
                packages = _compiled_packages(rego)
            except ConfigError as err:
                return [("extauthz.config", f"{spec.live['source']}: {err}")]
            known.append((rego, packages))
        problems = []
        for i, policy in asked:
            if any(
                entrypoint(policy, rego.decision).rsplit("/", 1)[0].replace("/", ".") in packages
                for rego, packages in known
            ):
                continue
            declared = sorted({p for _, packages in known for p in packages})
            dirs = ", ".join(str(rego.policy_dir) for rego, _ in known)
            problems.append(
                (
                    f"routes[{i}].authz",
                    f"no policy package {policy!r} in {dirs} (it declares: "
                    f"{', '.join(declared) or 'none'})",
                )
            )
        return problems

    def __init__(self, spec: ServiceSpec, *, tls: TlsSource | None) -> None:
        self.spec = spec
        self._tls = tls
        self._registry = CollectorRegistry()
        self.server: grpc.aio.Server | None = None
        self.http: CalloutServer | None = None
        self.fused: FusedDecider | None = None
        self.port = spec.port

    async def start(self) -> int:
        from legation.extauthz import service

        settings = service.Settings(
            host=self.spec.host,
            port=self.spec.bind_port(self.spec.port),
            config=dict(self.spec.live["config"]),
            registry=self._registry,
            tls=self._tls,
        )
        self.server, self.port = await service.start_server(settings)
        http = self.spec.live.get("http")
        if http is not None:
            from legation.services._fused import close_fused, start_fused

            try:
                self.fused = await start_fused(self.spec.live.get("fused"), self._registry)
                http = {**http, "port": self.spec.bind_port(http["port"] or 0)}
                if http["socket"] is not None:
                    http["socket"] = worker_socket(http["socket"], self.spec.worker)
                self.http = await _start_http(
                    service.servicer_of(self.server), self.spec.host, http, self._tls, self.fused
                )
            except BaseException:
                await close_fused(self.fused)
                self.fused = None
                await service.stop_server(self.server, 0)
                self.server = None
                raise
        return self.port

    async def apply(self, spec: ServiceSpec) -> None:
        from legation.extauthz import service

        if spec.live["config"] != self.spec.live["config"] and self.server is not None:
            await service.reconfigure(self.server, spec.live["loaded"])
        if self.fused is not None:
            from legation.services._fused import apply_fused

            apply_fused(self.fused, spec.live.get("fused"))
        self.spec = spec

    async def stop(self, grace: float) -> None:
        from legation.extauthz import service

        if self.http is not None:
            await self.http.close()  # the checks are the gRPC server's: closed with it
            self.http = None
        if self.fused is not None:
            from legation.services._fused import close_fused

            await close_fused(self.fused)
            self.fused = None
        if self.server is not None:
            await service.stop_server(self.server, grace)

    @property
    def registry(self) -> CollectorRegistry:
        return self._registry

    def status(self) -> dict[str, Any]:
        if self.http is None:
            return {}
        return {"http_socket": self.http.path} if self.http.path else {"http_port": self.http.port}

    @classmethod
    def add_cli_options(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--decision-log", help="overrides the config's decision_log")

    @classmethod
    async def serve_cli(
        cls, args: argparse.Namespace, *, host: str, port: int, reuse_port: bool
    ) -> tuple[grpc.aio.Server, int, Any]:
        from legation.extauthz import service

        settings = service.Settings(
            host=host,
            port=port,
            reuse_port=reuse_port,
            config_file=Path(args.config) if args.config else None,
            decision_log=args.decision_log,
        )
        server, bound = await service.start_server(settings)

        async def stop(grace: float) -> None:
            await service.stop_server(server, grace)

        return server, bound, stop


async def _start_http(
    servicer: Any,
    host: str,
    http: Mapping[str, Any],
    tls: TlsSource | None,
    fused: FusedDecider | None = None,
) -> CalloutServer:
    """The HTTP call-out around ``servicer``, with the gRPC server's mTLS when it has it;
    BindError when its port or socket cannot be bound."""
    from legation.fastpath import server as fastpath

    settings = fastpath.Settings(
        host=host,
        port=http["port"],
        path=http["socket"],
        upstream_headers=tuple(http["upstream_headers"]),
        client_headers=tuple(http["client_headers"]),
        tls=tls,
        fused=fused,
    )
    try:
        return await fastpath.serve(servicer, settings)
    except OSError as err:
        where = (
            f"{http['socket']} (http_socket)"
            if http["socket"] is not None
            else f"{host}:{http['port']} (http_port)"
        )
        raise BindError(f"extauthz: cannot listen on {where}: {err.strerror or err}") from None


_COMPILED: dict[tuple[Any, ...], frozenset[str] | ConfigError] = {}
_COMPILED_KEEP = 16


def _compiled_packages(rego: Any) -> frozenset[str]:
    """The packages a rego check's policy directory declares, once its policies compiled in the
    engine (as the check's policy store loads them): a syntax or type error is a ConfigError
    naming the file, here in the validation phase, so the control plane rejects the change
    instead of counting it applied while the store refuses it. Remembered per directory
    content, so an unchanged directory (a file saved again as it was, too) is not compiled again."""
    from legation.extauthz import policies

    src = policies.read_sources(Path(rego.policy_dir), tests=rego.include_tests)
    digest = hashlib.sha256(repr((src.modules, src.data)).encode()).hexdigest()
    key = (str(rego.policy_dir), digest, rego.decision, rego.include_tests, rego.allow_network)
    found = _COMPILED.get(key)
    if found is None:
        try:
            found = policies.load(
                Path(rego.policy_dir),
                rules=(rego.decision,),
                probe_timeout_s=rego.probe_timeout_s,
                tests=rego.include_tests,
                allow_network=rego.allow_network,
            ).packages
        except ConfigError as err:
            found = err
        while len(_COMPILED) >= _COMPILED_KEEP:
            _COMPILED.pop(next(iter(_COMPILED)))
        _COMPILED[key] = found
    if isinstance(found, ConfigError):
        raise found
    return found


def _regos(loaded: LoadedConfig) -> list[Any]:
    """The configs of the rego checks the routes run (the default checks, else all of them)."""
    names = loaded.service.default_checks or list(loaded.check_configs)
    return [loaded.check_configs[n][1] for n in names if loaded.check_configs[n][0] == "rego"]
