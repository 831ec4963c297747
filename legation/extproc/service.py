"""Starting the ext_proc gRPC service (called by the ``legation`` CLI and by tests)."""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from pathlib import Path

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from prometheus_client import CollectorRegistry

from legation._protowire import serialize
from legation.errors import ConfigError
from legation.extproc.config import Chains, load_chains
from legation.extproc.metrics import Metrics
from legation.extproc.servicer import DEFAULT_STREAM_IDLE_TIMEOUT, ExtProcServicer
from legation.grpc_server import ServerTls, TlsSource, add_methods, start_grpc_server


@dataclass(frozen=True, kw_only=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 0
    """0 binds an ephemeral port; :func:`start_server` returns the bound one."""
    reuse_port: bool = False
    """SO_REUSEPORT, for ``--workers N`` forked processes sharing one port."""
    config_file: str | Path | None = None
    """The chains YAML (see :mod:`legation.extproc.config`); or pass ``chains``."""
    chains: Chains | None = None
    message_timeout: float = 0.2
    """Envoy's ``message_timeout`` (the value its ext_proc filter is configured with, default
    200 ms). Each phase here gets 80% of it (:data:`legation.extproc.guard.DEADLINE_SHARE`): a
    filter still running then is cancelled (or left behind, on a thread) and the guard answers
    with the chain's failure behaviour before Envoy would answer 504."""
    stream_idle_timeout: float = DEFAULT_STREAM_IDLE_TIMEOUT
    """Seconds a stream may go without a message from Envoy before it is ended (DEADLINE_EXCEEDED);
    keep it above the routes' timeouts (Envoy waits for the upstream between request and response
    messages). Default 300, Envoy's own default stream idle timeout."""
    registry: CollectorRegistry | None = None
    """Prometheus registry for the metrics (default: the global one)."""
    max_concurrent_streams: int | None = None
    tls: ServerTls | TlsSource | None = None
    """None: plaintext; else mTLS (see :mod:`legation.grpc_server`)."""


_running: weakref.WeakKeyDictionary[grpc.aio.Server, ExtProcServicer] = weakref.WeakKeyDictionary()


def servicer_of(server: grpc.aio.Server) -> ExtProcServicer:
    """The servicer a running server answers with (the HTTP transport serves its processor:
    :func:`legation.extproc.http_server.serve_http`)."""
    return _running[server]


def _chains(settings: Settings) -> Chains:
    if settings.chains is not None:
        return settings.chains
    if settings.config_file is not None:
        return load_chains(settings.config_file)
    raise ConfigError("extproc: Settings needs config_file or chains")


SERVICE_NAME = "envoy.service.ext_proc.v3.ExternalProcessor"


def register(servicer: ExtProcServicer, server: grpc.aio.Server) -> None:
    """Serve ``Process`` with ``servicer``: the generated
    ``add_ExternalProcessorServicer_to_server``, but with a serializer that sends the answers
    already encoded (:data:`legation.extproc._wire.WIRE`) as they are."""
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.Process,
        request_deserializer=pb.ProcessingRequest.FromString,
        response_serializer=serialize,
    )
    add_methods(server, SERVICE_NAME, {"Process": handler})


async def start_server(settings: Settings) -> tuple[grpc.aio.Server, int]:
    """Build, bind and start the server; returns it and the bound port. A port that cannot be
    bound raises :class:`~legation.grpc_server.BindError`."""
    if settings.message_timeout <= 0:
        raise ConfigError("extproc: message_timeout must be positive")
    if settings.stream_idle_timeout <= 0:
        raise ConfigError("extproc: stream_idle_timeout must be positive")
    servicer = ExtProcServicer(
        _chains(settings),
        metrics=Metrics(settings.registry),
        message_timeout=settings.message_timeout,
        stream_idle_timeout=settings.stream_idle_timeout,
    )
    options: list[tuple[str, int]] = []
    if settings.max_concurrent_streams:
        options.append(("grpc.max_concurrent_streams", settings.max_concurrent_streams))
    server, port = await start_grpc_server(
        "extproc",
        lambda s: register(servicer, s),
        host=settings.host,
        port=settings.port,
        reuse_port=settings.reuse_port,
        options=options,
        tls=settings.tls,
    )
    _running[server] = servicer
    return server, port
