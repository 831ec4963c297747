"""Start the ext_authz gRPC service: the contract the ``legation`` CLI calls.

``start_server(Settings(...))`` loads and validates the config, creates and starts the checks,
binds and starts a grpc.aio server (plaintext, or mTLS with ``tls``; a port that cannot be bound
raises :class:`~legation.grpc_server.BindError`) and returns it with its bound port.
``stop_server`` also stops the checks' background work (policy watchers, HTTP sessions) and
closes the decision log. ``reconfigure`` swaps a running server's config and checks in place.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from envoy.service.auth.v3 import external_auth_pb2
from prometheus_client import CollectorRegistry

from legation import plugins
from legation._protowire import serialize
from legation.extauthz.checks import Check
from legation.extauthz.config import KIND, LoadedConfig, load_file, load_mapping
from legation.extauthz.observe import DecisionLog, Metrics
from legation.extauthz.servicer import AuthorizationServicer
from legation.grpc_server import ServerTls, TlsSource, add_methods, start_grpc_server


@dataclass(frozen=True, kw_only=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 0
    reuse_port: bool = False
    config_file: Path | None = None
    config: dict[str, Any] | None = None  # the same document as the file, inline
    decision_log: str | None = None  # overrides the config's decision_log
    registry: CollectorRegistry | None = None  # None: prometheus_client's default registry
    max_concurrent_streams: int = 0  # 0: gRPC default
    tls: ServerTls | TlsSource | None = None  # None: plaintext; see legation.grpc_server


SERVICE_NAME = external_auth_pb2.DESCRIPTOR.services_by_name["Authorization"].full_name

_running: weakref.WeakKeyDictionary[grpc.aio.Server, AuthorizationServicer] = (
    weakref.WeakKeyDictionary()
)


def load(settings: Settings) -> LoadedConfig:
    if settings.config_file is not None:
        return load_file(settings.config_file)
    return load_mapping(settings.config or {}, source="<settings.config>")


async def start_checks(loaded: LoadedConfig) -> dict[str, Check]:
    """Create and start the config's checks; if one fails to start, close those started."""
    checks: dict[str, Check] = {}
    try:
        for name, (kind, config) in loaded.check_configs.items():
            where = f"{loaded.source}: checks.{name}"
            check = plugins.get(KIND, kind, where=where).create(config)
            checks[name] = check
            await check.start()
    except BaseException:
        for check in checks.values():
            await check.close()
        raise
    return checks


async def build_servicer(settings: Settings) -> AuthorizationServicer:
    loaded = load(settings)
    checks = await start_checks(loaded)
    metrics = Metrics(settings.registry)
    metrics.watch_reloads(checks)
    return AuthorizationServicer(
        config=loaded.service,
        checks=checks,
        metrics=metrics,
        decision_log=DecisionLog(settings.decision_log or loaded.service.decision_log),
        input_options=loaded.input_options,
    )


def register(servicer: AuthorizationServicer, server: grpc.aio.Server) -> None:
    """Serve ``envoy.service.auth.v3.Authorization/Check`` with ``servicer.check_wire``: the
    generated ``add_AuthorizationServicer_to_server`` but with a serializer that passes the
    answers already encoded as they are."""
    handler = grpc.unary_unary_rpc_method_handler(
        servicer.check_wire,
        request_deserializer=external_auth_pb2.CheckRequest.FromString,
        response_serializer=serialize,
    )
    add_methods(server, SERVICE_NAME, {"Check": handler})


async def start_server(settings: Settings) -> tuple[grpc.aio.Server, int]:
    servicer = await build_servicer(settings)
    options: list[tuple[str, Any]] = []
    if settings.max_concurrent_streams:
        options.append(("grpc.max_concurrent_streams", settings.max_concurrent_streams))
    try:
        server, port = await start_grpc_server(
            "extauthz",
            lambda s: register(servicer, s),
            host=settings.host,
            port=settings.port,
            reuse_port=settings.reuse_port,
            options=options,
            tls=settings.tls,
        )
    except BaseException:
        await close_checks(servicer)
        raise
    _running[server] = servicer
    return server, port


def servicer_of(server: grpc.aio.Server) -> AuthorizationServicer:
    """The servicer a running server answers with (the HTTP call-out serves the same one)."""
    return _running[server]


async def reconfigure(
    server: grpc.aio.Server,
    loaded: LoadedConfig,
    *,
    decision_log: str | None = None,
    grace: float = 5.0,
) -> None:
    """Swap a running server's config and checks in place (no restart, no dropped call): the
    new checks start first (a failure raises and keeps the running ones); the old ones are
    closed ``grace`` seconds later, when the calls they were serving are done."""
    servicer = _running[server]
    checks = await start_checks(loaded)
    target = decision_log or loaded.service.decision_log
    old_checks, old_log = servicer.checks, servicer.decision_log
    keep_log = target == servicer.config.decision_log and decision_log is None
    servicer.swap(
        config=loaded.service,
        checks=checks,
        decision_log=old_log if keep_log else DecisionLog(target),
        input_options=loaded.input_options,
    )
    servicer.metrics.watch_reloads(checks)

    async def retire() -> None:
        try:
            await asyncio.sleep(grace)
        finally:  # stop_server cancels the wait: close now
            for check in old_checks.values():
                await check.close()
            if not keep_log:
                old_log.close()

    tasks = _retiring.setdefault(servicer, set())
    task = asyncio.get_running_loop().create_task(retire())
    tasks.add(task)
    task.add_done_callback(tasks.discard)


_retiring: weakref.WeakKeyDictionary[AuthorizationServicer, set[asyncio.Task[None]]] = (
    weakref.WeakKeyDictionary()
)


async def close_checks(servicer: AuthorizationServicer) -> None:
    for check in servicer.checks.values():
        await check.close()
    servicer.decision_log.close()


async def stop_server(server: grpc.aio.Server, grace: float | None = None) -> None:
    await server.stop(grace)
    servicer = _running.pop(server, None)
    if servicer is not None:
        for task in list(_retiring.pop(servicer, ())):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await close_checks(servicer)
