"""The request-path services a mesh declares, run in-process next to the control plane.

``legation up`` and ``legation serve xds`` start the mesh's ``extauthz``, ``extproc`` and
``ratelimit`` blocks whose ``embedded`` is true (the default) as grpc.aio servers on the control
plane's event loop, before any Envoy starts, and stop them after the Envoys. Blocks with
``embedded: false`` describe a service running elsewhere: only the Envoy side is configured.

Two steps, so that a bad file never replaces a running service:

* :func:`plan` (pure but for reading files) validates what each service needs: the ext_authz YAML
  (``extauthz.config``; ``policy_dir``, ``jwks_file`` and ``decision_log`` in it are resolved
  against its own folder, which the ext_authz package itself does not do), the
  envoyproxy/ratelimit YAML (``ratelimit.config``, which must declare the mesh's ``domain``), the
  ext_proc chains built from the routes' ``filters`` (one chain per route, named after it). A
  problem raises :class:`~legation.config.MeshConfigError` naming the mesh file and the field.
* :meth:`EmbeddedServices.apply` makes the running services match a plan: it starts what is new,
  stops what is gone, restarts a service whose block (or ext_authz file) changed, and swaps the
  ext_proc chains in place when only the routes changed: streams already open finish on the
  chains they started with. The previous generation's chains stay served next to the new ones, so
  an Envoy still on the old routes never names an unknown chain.

With the mesh's mTLS on (and the block's ``tls`` not ``none``), each embedded service serves
mutual TLS: a server certificate for ``spiffe://<trust_domain>/ns/<namespace>/sa/legation-<kind>``
from the mesh CA, and only clients whose certificate chains to that CA (the mesh's proxies) get
through the handshake. The certificate comes from ``tls_source`` (the control plane's
:meth:`~legation.certs.MeshIssuer.service_tls`), asked before every handshake, so renewals need
no restart; turning TLS on or off restarts the service.

The rate-limit service watches its own file (hot reload keeps the last good config); Rego
policies are re-read by the ext_authz service's policy store. Each started service gets its own
Prometheus registry (:meth:`EmbeddedServices.registries`), served on the control plane's /metrics.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as extproc_grpc
from prometheus_client import CollectorRegistry

from legation import _yaml, plugins
from legation.config import Mesh, MeshConfigError, Problem
from legation.config.extensions import FILTER_KIND, SERVICE_KINDS
from legation.errors import ConfigError, LegationError
from legation.extproc.chain import Chain
from legation.extproc.config import Chains
from legation.extproc.metrics import Metrics as ExtProcMetrics
from legation.extproc.servicer import ExtProcServicer
from legation.grpc_server import ServerTls, TlsSource, start_grpc_server

log = logging.getLogger("legation.services")

KINDS = SERVICE_KINDS


class ServiceStartError(LegationError):
    """An embedded service could not start (its port is taken, its checks failed to start)."""


def route_chains(mesh: Mesh) -> Chains:
    """One ext_proc chain per route with ``filters``, named after the route. Options were
    validated when the mesh was loaded; the chain fails open only if ``extproc`` says so."""
    fail_open = mesh.extproc.fail_open if mesh.extproc is not None else False
    chains: dict[str, Chain] = {}
    for route in mesh.routes:
        if not route.filters:
            continue
        filters = []
        for spec in route.filters:
            factory = plugins.get(FILTER_KIND, spec.name)
            filters.append(factory.create(factory.validate(dict(spec.options))))
        chains[route.name] = Chain(name=route.name, filters=filters, fail_open=fail_open)
    return Chains(chains=chains)


# -- plans --------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class ServiceSpec:
    """One embedded service to run: where, and with what. ``key`` changes iff a restart is due."""

    kind: str
    host: str
    port: int
    key: str
    settings: Mapping[str, Any] = field(default_factory=dict)
    chains: Chains | None = None  # extproc only
    tls: bool = False  # serve mesh mTLS (certificate from EmbeddedServices' tls_source)


@dataclass(frozen=True)
class Plan:
    """The embedded services of one mesh generation, validated; ``remote`` are the addresses of
    the declared services that run elsewhere."""

    embedded: Mapping[str, ServiceSpec]
    remote: Mapping[str, str]


def plan(
    mesh: Mesh, *, mesh_path: str | Path, reserved: Mapping[int, str] | None = None
) -> Plan:
    """Validate what the mesh's services need; raise MeshConfigError naming file and field.
    ``reserved`` ports (e.g. the status endpoint's) cannot be used by an embedded service."""
    source = str(mesh_path)
    base = Path(mesh_path).resolve().parent
    problems: list[Problem] = []
    embedded: dict[str, ServiceSpec] = {}
    remote: dict[str, str] = {}
    for kind in KINDS:
        block = getattr(mesh, kind)
        if block is None:
            continue
        if not block.embedded:
            remote[kind] = f"{block.host}:{block.port}"
            continue
        if block.port in (reserved or {}):
            problems.append(
                Problem(f"{kind}.port", f"port {block.port} is {(reserved or {})[block.port]}")
            )
            continue
        try:
            spec = _SPECS[kind](mesh, base)
        except _Invalid as err:
            problems.append(Problem(f"{kind}.{err.field}", str(err)))
            continue
        tls = block.mesh_tls(mtls_enabled=mesh.mtls.enabled)
        embedded[kind] = replace(spec, tls=tls, key=_key(spec.key, tls))
    if problems:
        raise MeshConfigError(source, problems)
    return Plan(embedded=embedded, remote=remote)


class _Invalid(Exception):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def _key(*parts: Any) -> str:
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _authz_spec(mesh: Mesh, base: Path) -> ServiceSpec:
    from legation.extauthz.config import load_mapping, resolve_paths

    block = mesh.extauthz
    assert block is not None and block.config is not None
    path = base / block.config
    try:
        raw = _yaml.load_file(path) or {}
    except OSError as err:
        raise _Invalid("config", f"cannot read {path}: {err.strerror or err}") from None
    except _yaml.YamlError as err:
        raise _Invalid("config", str(err)) from None
    raw = resolve_paths(raw, path.resolve().parent)
    try:
        load_mapping(raw, source=str(path))
    except ConfigError as err:
        raise _Invalid("config", str(err)) from None
    return ServiceSpec(
        kind="extauthz",
        host=block.host,
        port=block.port,
        key=_key(block.model_dump(mode="json"), raw),
        settings={"config": raw},
    )


def _proc_spec(mesh: Mesh, base: Path) -> ServiceSpec:
    block = mesh.extproc
    assert block is not None
    return ServiceSpec(
        kind="extproc",
        host=block.host,
        port=block.port,
        key=_key(block.host, block.port, block.timeout.total_seconds()),
        settings={"message_timeout": block.timeout.total_seconds()},
        chains=route_chains(mesh),
    )


def _ratelimit_spec(mesh: Mesh, base: Path) -> ServiceSpec:
    from legation.ratelimit.config import load_files

    block = mesh.ratelimit
    assert block is not None and block.config is not None
    path = base / block.config
    try:
        loaded = load_files([path])
    except ConfigError as err:
        raise _Invalid("config", str(err)) from None
    if block.domain not in loaded.domains:
        found = ", ".join(sorted(loaded.domains)) or "none"
        raise _Invalid(
            "domain", f"{block.domain!r} is not the domain of {path} (it declares: {found})"
        )
    options = {"url": block.redis_url} if block.backend == "redis" else {}
    return ServiceSpec(
        kind="ratelimit",
        host=block.host,
        port=block.port,
        key=_key(block.model_dump(mode="json"), str(path)),
        settings={
            "config_paths": (str(path),),
            "backend": block.backend,
            "backend_options": options,
            "failure_mode": "allow" if block.fail_open else "deny",
            "shadow_mode": block.shadow_mode,
        },
    )


_SPECS: dict[str, Callable[[Mesh, Path], ServiceSpec]] = {
    "extauthz": _authz_spec,
    "extproc": _proc_spec,
    "ratelimit": _ratelimit_spec,
}


# -- running ------------------------------------------------------------------------------------


class _ChainSwitch(extproc_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    """The ext_proc servicer behind a reference that a reload swaps. The ext_proc package's
    servicer fixes its chains when built, so a new one is built per generation; a stream stays
    with the servicer it started on."""

    def __init__(self, inner: ExtProcServicer) -> None:
        self.inner = inner

    async def Process(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        await self.inner.Process(request_iterator, context)


@dataclass
class _Running:
    spec: ServiceSpec
    server: grpc.aio.Server
    port: int
    registry: CollectorRegistry
    switch: _ChainSwitch | None = None
    metrics: ExtProcMetrics | None = None


class EmbeddedServices:
    """The embedded services of the current mesh generation."""

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
        self.running: dict[str, _Running] = {}
        self.remote: dict[str, str] = {}
        self._chains: Chains = Chains(chains={})

    async def apply(self, target: Plan) -> list[str]:
        """Make the running services match ``target``. Returns the failures (each also reported
        through ``on_event``); a service that failed to start is left stopped."""
        failures = []
        self.remote = dict(target.remote)
        for kind in KINDS:
            want, have = target.embedded.get(kind), self.running.get(kind)
            if have is not None and want is not None and have.spec.key == want.key:
                if kind == "extproc":
                    self._swap_chains(have, want)
                have.spec = want
                continue
            if have is not None:
                await self._stop(kind)
            if want is None:
                continue
            try:
                self.running[kind] = await _START[kind](self, want)
            except (OSError, RuntimeError, LegationError) as err:
                message = (
                    f"cannot start the embedded {kind} service on {want.host}:{want.port}: {err}"
                )
                self.on_event(message)
                failures.append(message)
                continue
            self.on_event(f"{kind} service on {want.host}:{self.running[kind].port}"
                          + (" (restarted)" if have is not None else ""))
        return failures

    async def stop(self) -> None:
        for kind in reversed(KINDS):
            if kind in self.running:
                await self._stop(kind)

    def registries(self) -> list[CollectorRegistry]:
        return [r.registry for r in self.running.values()]

    def status(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for kind, running in self.running.items():
            out[kind] = {"embedded": True, "address": f"{running.spec.host}:{running.port}",
                         "tls": "mesh" if running.spec.tls else "none"}
        for kind, address in self.remote.items():
            out[kind] = {"embedded": False, "address": address}
        return out

    # -- per kind ---------------------------------------------------------------------------

    def _tls(self, spec: ServiceSpec) -> TlsSource | None:
        if not spec.tls:
            return None
        source = self.tls_source
        if source is None or source(spec.kind) is None:
            raise ServiceStartError(f"{spec.kind}: no mesh certificate to serve mTLS with",
                                    code="service_start_failed")
        kind = spec.kind
        return lambda: source(kind)

    async def _stop(self, kind: str) -> None:
        running = self.running.pop(kind)
        if kind == "extauthz":
            from legation.extauthz.service import stop_server

            await stop_server(running.server, 0.5)
        else:
            await running.server.stop(0.5)

    async def _start_extauthz(self, spec: ServiceSpec) -> _Running:
        from legation.extauthz import service

        registry = CollectorRegistry()
        settings = service.Settings(
            host=spec.host, port=spec.port, config=dict(spec.settings["config"]),
            registry=registry, tls=self._tls(spec),
        )
        server, port = await service.start_server(settings)
        return _Running(spec, server, port, registry)

    async def _start_ratelimit(self, spec: ServiceSpec) -> _Running:
        from legation.ratelimit import service

        registry = CollectorRegistry()
        settings = service.Settings(
            host=spec.host, port=spec.port, metrics_registry=registry, tls=self._tls(spec),
            **spec.settings,
        )
        server, port = await service.start_server(settings)
        return _Running(spec, server, port, registry)

    async def _start_extproc(self, spec: ServiceSpec) -> _Running:
        assert spec.chains is not None
        registry = CollectorRegistry()
        metrics = ExtProcMetrics(registry)
        switch = _ChainSwitch(self._servicer(spec, spec.chains, metrics))
        server, port = await start_grpc_server(
            "extproc", lambda s: extproc_grpc.add_ExternalProcessorServicer_to_server(switch, s),
            host=spec.host, port=spec.port, tls=self._tls(spec),
        )
        self._chains = spec.chains
        return _Running(spec, server, port, registry, switch=switch, metrics=metrics)

    def _servicer(self, spec: ServiceSpec, chains: Chains, metrics: ExtProcMetrics
                  ) -> ExtProcServicer:
        return ExtProcServicer(
            chains, metrics=metrics, message_timeout=float(spec.settings["message_timeout"])
        )

    def _swap_chains(self, running: _Running, want: ServiceSpec) -> None:
        assert want.chains is not None and running.switch is not None
        assert running.metrics is not None
        served = Chains(chains={**self._chains.chains, **want.chains.chains})
        running.switch.inner = self._servicer(want, served, running.metrics)
        self._chains = want.chains


_START: dict[str, Callable[[EmbeddedServices, ServiceSpec], Any]] = {
    "extauthz": EmbeddedServices._start_extauthz,
    "extproc": EmbeddedServices._start_extproc,
    "ratelimit": EmbeddedServices._start_ratelimit,
}
