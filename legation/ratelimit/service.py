"""The grpc.aio ``envoy.service.ratelimit.v3.RateLimitService`` and how to start it.

``start_server(Settings(port=0, config_files=("limits.yaml",)))`` loads the config (a bad one fails
the start with a :class:`ConfigError` naming file and field), creates the backend plugin, binds
(plaintext, or mTLS with ``tls``; a taken port raises :class:`~legation.grpc_server.BindError`),
starts, watches the files for hot reload, and returns ``(server, port)``. ``await server.stop(g)``
also stops the watcher and closes the backend. ``server.legation_limiter`` is the running
:class:`RateLimiter` (its config, backend, metrics), ``server.legation_watcher`` the watcher.

Failure mode: when the counter store cannot answer, ``failure_mode="allow"`` answers OK (counted in
``legation_ratelimit_failure_mode_total{action="allow"}``), ``"deny"`` answers gRPC UNAVAILABLE so
Envoy applies its own ``failure_mode_deny``, which :func:`legation.ratelimit.envoy_filter.
rate_limit_filter` sets from the same setting: the store being down and this service being down
then look the same to clients. ``"local"`` decides in this process's memory with the same limits
(divided by ``local_instances``, default 1) until the store answers a probe again
(:mod:`legation.ratelimit.fallback`); Envoy is configured to allow when this service itself
cannot be reached. A malformed request gets INVALID_ARGUMENT, never a crash.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from prometheus_client import CollectorRegistry

from legation import plugins
from legation.errors import ConfigError
from legation.grpc_server import ServerTls, TlsSource, add_methods, start_grpc_server
from legation.ratelimit._request import parse_request
from legation.ratelimit.config import RateLimitConfig
from legation.ratelimit.errors import RateLimitError
from legation.ratelimit.fallback import LocalFallback
from legation.ratelimit.limiter import RateLimiter, ResponseHeaders
from legation.ratelimit.metrics import RateLimitMetrics
from legation.ratelimit.watch import ConfigWatcher
from legation.tracing.spans import CallTracer, SpanContext

log = logging.getLogger(__name__)
FAILURE_MODES = ("allow", "deny", "local")


@dataclass(frozen=True, kw_only=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 0
    reuse_port: bool = False
    config_files: tuple[str, ...] = ()
    backend: str = "memory"
    backend_options: Mapping[str, Any] = field(default_factory=dict)
    failure_mode: str = "allow"
    local_instances: int = 1  # failure_mode local: limits divided by this while the store is away
    shadow_mode: bool = False  # upstream SHADOW_MODE: statuses as found, overall always OK
    quota_mode: bool = False  # upstream QUOTA_MODE: refuse only when every descriptor is over
    near_limit_ratio: float = 0.8
    merge_domains: bool = False  # upstream MERGE_DOMAIN_CONFIG: files of one domain add up
    response_headers: bool = False  # upstream LIMIT_RESPONSE_HEADERS_ENABLED
    header_limit: str = "RateLimit-Limit"  # upstream LIMIT_LIMIT_HEADER
    header_remaining: str = "RateLimit-Remaining"  # upstream LIMIT_REMAINING_HEADER
    header_reset: str = "RateLimit-Reset"  # upstream LIMIT_RESET_HEADER
    response_dynamic_metadata: bool = False  # upstream RESPONSE_DYNAMIC_METADATA
    reload_interval: float = 1.0  # seconds between polls of config_files; 0 turns reload off
    registry: CollectorRegistry | None = None
    clock: Callable[[], float] = time.time
    tls: ServerTls | TlsSource | None = None  # None: plaintext; see legation.grpc_server

    def __post_init__(self) -> None:
        if self.failure_mode not in FAILURE_MODES:
            raise ConfigError(
                f"ratelimit settings: failure_mode: expected one of "
                f"{', '.join(FAILURE_MODES)}, got {self.failure_mode!r}",
                code="invalid_failure_mode",
            )
        if (
            isinstance(self.local_instances, bool)
            or not isinstance(self.local_instances, int)
            or self.local_instances < 1
        ):
            raise ConfigError(
                "ratelimit settings: local_instances: expected an integer >= 1, "
                f"got {self.local_instances!r}",
                code="invalid_type",
            )
        if not 0 < self.near_limit_ratio <= 1:
            raise ConfigError(
                "ratelimit settings: near_limit_ratio: expected 0 < ratio <= 1",
                code="invalid_near_limit_ratio",
            )
        if isinstance(self.config_files, str):
            raise ConfigError(
                "ratelimit settings: config_files: expected a tuple of paths", code="invalid_type"
            )


class RateLimitServicer(rls_pb2_grpc.RateLimitServiceServicer):
    """The one boundary where :class:`RateLimitError` becomes a gRPC answer.

    Setting :attr:`failure_mode` (also live, on a reload) to or from ``local`` wraps the limiter's
    backend in a :class:`LocalFallback` or takes it out again."""

    def __init__(
        self, limiter: RateLimiter, *, failure_mode: str = "allow", local_instances: int = 1
    ) -> None:
        self.limiter = limiter
        self.local_instances = local_instances
        self._failure_mode = "allow"
        self.failure_mode = failure_mode
        self._last_log = 0.0

    @property
    def failure_mode(self) -> str:
        return self._failure_mode

    @failure_mode.setter
    def failure_mode(self, mode: str) -> None:
        limiter = self.limiter
        if mode == "local" and isinstance(limiter.backend, LocalFallback):
            limiter.backend.share_among(self.local_instances)
        elif mode == "local":
            limiter.backend = LocalFallback(
                limiter.backend, metrics=limiter.metrics, instances=self.local_instances
            )
        elif mode != "local" and isinstance(limiter.backend, LocalFallback):
            limiter.backend = limiter.backend.store  # its in-memory counters are dropped
        self._failure_mode = mode

    async def decide(
        self, request: rls_pb2.RateLimitRequest
    ) -> rls_pb2.RateLimitResponse | RateLimitError:
        """The answer to ``request``, or the store's error when the failure mode denies. Raises
        :class:`RateLimitError` ``invalid_request`` for a malformed request. Shared by
        ``ShouldRateLimit`` and the fused HTTP call-out (:mod:`legation.fastpath.fused`), so
        both count and fail alike."""
        try:
            return await self.limiter.should_rate_limit(request)
        except RateLimitError as exc:
            if exc.code == "invalid_request":
                raise
            return self._failed(exc)

    def _failed(self, exc: RateLimitError) -> rls_pb2.RateLimitResponse | RateLimitError:
        """The answer when the store failed with ``exc`` (not an invalid request): counted,
        logged, and OK or ``exc`` as the failure mode says."""
        self.limiter.metrics.backend_errors.labels(exc.code).inc()
        self._log(exc)
        self.limiter.metrics.failure_mode.labels(self.failure_mode).inc()
        if self.failure_mode != "deny":  # local: only when the fallback itself failed
            return rls_pb2.RateLimitResponse(overall_code=rls_pb2.RateLimitResponse.OK)
        return exc

    async def ShouldRateLimit(
        self, request: rls_pb2.RateLimitRequest, context: grpc.aio.ServicerContext
    ) -> rls_pb2.RateLimitResponse:
        """The answer as a message (for Python callers; the server sends :meth:`answer_wire`'s
        bytes)."""
        answer = await self.answer_wire(request.SerializeToString(), context, request)
        return rls_pb2.RateLimitResponse.FromString(answer)

    async def answer_wire(
        self,
        raw: bytes,
        context: grpc.aio.ServicerContext,
        request: rls_pb2.RateLimitRequest | None = None,
    ) -> bytes:
        """The serialized answer to the serialized request ``raw``, as the server receives and
        sends them: no message is parsed or built for a request seen before
        (:meth:`RateLimiter.answer`)."""
        if TRACER.on:
            parent = TRACER.parent_in(context.invocation_metadata())
            if parent is not None:
                try:
                    request = request if request is not None else parse_request(raw)
                except RateLimitError as exc:
                    return (await self._refuse(exc, context)).SerializeToString()
                response = await self._traced(request, context, parent)
                return response.SerializeToString()
        try:  # the hot path: no coroutine frame between the server and the limiter
            return await self.limiter.answer(raw, request)
        except RateLimitError as exc:
            answer = exc if exc.code == "invalid_request" else self._failed(exc)
            response = await self._refuse(answer, context)
            return response.SerializeToString()

    async def _traced(
        self,
        request: rls_pb2.RateLimitRequest,
        context: grpc.aio.ServicerContext,
        parent: SpanContext,
    ) -> rls_pb2.RateLimitResponse:
        start, response = time.time_ns(), None
        try:
            response = await self._answer(request, context)
            return response
        finally:
            trace_decision(parent, start, request, response)

    async def _answer(
        self, request: rls_pb2.RateLimitRequest, context: grpc.aio.ServicerContext
    ) -> rls_pb2.RateLimitResponse:
        try:
            answer = await self.decide(request)
        except RateLimitError as exc:
            answer = exc
        return await self._refuse(answer, context)

    async def _refuse(
        self,
        answer: rls_pb2.RateLimitResponse | RateLimitError,
        context: grpc.aio.ServicerContext,
    ) -> rls_pb2.RateLimitResponse:
        """``answer`` as gRPC sends it: a response as it is, an invalid request as
        INVALID_ARGUMENT, the store's error (failure mode deny) as UNAVAILABLE."""
        if isinstance(answer, RateLimitError):
            if answer.code == "invalid_request":
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(answer))
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"rate limit store: {answer.code}")
            raise AssertionError("unreachable") from None  # context.abort raises
        return answer

    def _log(self, exc: RateLimitError) -> None:
        now = time.monotonic()
        if now - self._last_log >= 5.0:  # a down store must not flood the log
            self._last_log = now
            log.warning("rate-limit store failed (failure mode %s): %s", self.failure_mode, exc)


TRACER = CallTracer("ratelimit")  # one span per decision, under the Envoy span that asked
_UNITS = {v: k.lower() for k, v in rls_pb2.RateLimitResponse.RateLimit.Unit.items()}


def trace_decision(
    parent: SpanContext,
    start: int,
    request: rls_pb2.RateLimitRequest,
    response: rls_pb2.RateLimitResponse | None,
) -> None:
    """The decision's span: the domain, the descriptors' keys (never their values: a
    descriptor may carry any header's), the answer and the limit that decided it. Also used by
    the fused HTTP call-out (:mod:`legation.fastpath.fused`)."""
    decision, limit = "ERROR", None
    if response is not None:
        decision = rls_pb2.RateLimitResponse.Code.Name(response.overall_code)
        for status in response.statuses:
            if status.HasField("current_limit") and (limit is None or status.code == 2):
                lim = status.current_limit
                limit = f"{lim.requests_per_unit}/{_UNITS.get(lim.unit, '?')}"
    keys = ";".join(",".join(e.key for e in d.entries) for d in request.descriptors)
    TRACER.record(
        "legation.ratelimit decision",
        parent,
        start_ns=start,
        end_ns=time.time_ns(),
        attributes={
            "legation.domain": request.domain,
            "legation.descriptors": keys,
            "legation.decision": decision,
            "legation.limit": limit,
        },
        error=response is None,
    )


SERVICE_NAME = "envoy.service.ratelimit.v3.RateLimitService"


def register(servicer: RateLimitServicer, server: grpc.aio.Server) -> None:
    """Serve ``ShouldRateLimit`` with ``servicer.answer_wire``: the generated
    ``add_RateLimitServiceServicer_to_server``, but the request reaches the servicer as bytes
    and the answer leaves as the bytes it returns."""
    handler = grpc.unary_unary_rpc_method_handler(servicer.answer_wire)
    add_methods(server, SERVICE_NAME, {"ShouldRateLimit": handler})


def build_limiter(settings: Settings, config: RateLimitConfig) -> RateLimiter:
    """The limiter with its backend plugin (validated, then created) and metrics."""
    factory = plugins.get(
        "ratelimit.backend", settings.backend, where="ratelimit settings: backend"
    )
    backend = factory.create(factory.validate(dict(settings.backend_options)))
    metrics = RateLimitMetrics.for_registry(settings.registry)
    metrics.track_backend(backend)
    return RateLimiter(
        config=config,
        backend=backend,
        metrics=metrics,
        shadow_mode=settings.shadow_mode,
        quota_mode=settings.quota_mode,
        near_limit_ratio=settings.near_limit_ratio,
        response_headers=ResponseHeaders(
            limit=settings.header_limit,
            remaining=settings.header_remaining,
            reset=settings.header_reset,
        )
        if settings.response_headers
        else None,
        dynamic_metadata=settings.response_dynamic_metadata,
        clock=settings.clock,
    )


async def start_server(
    settings: Settings, *, config: RateLimitConfig | None = None
) -> tuple[grpc.aio.Server, int]:
    """``config``: the limits, already loaded from ``config_files`` (the embedded service's
    plan loaded them to validate the mesh); None: load them here."""
    metrics = RateLimitMetrics.for_registry(settings.registry)
    limiter: RateLimiter | None = None
    watcher = ConfigWatcher(
        settings.config_files,
        lambda c: limiter.swap(c),  # type: ignore[union-attr]
        metrics=metrics,
        interval=settings.reload_interval,
        merge_domains=settings.merge_domains,
    )
    if config is None:
        config = watcher.load() if settings.config_files else RateLimitConfig()
    limiter = build_limiter(settings, config)
    servicer = RateLimitServicer(
        limiter, failure_mode=settings.failure_mode, local_instances=settings.local_instances
    )
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    try:
        server, port = await start_grpc_server(
            "ratelimit",
            lambda s: register(servicer, s),
            host=settings.host,
            port=settings.port,
            reuse_port=settings.reuse_port,
            tls=settings.tls,
        )
    except BaseException:
        await limiter.backend.close()
        raise
    if settings.config_files and settings.reload_interval > 0:
        watcher.start()
    original_stop = server.stop

    async def stop(grace: float | None) -> None:
        await original_stop(grace)
        await watcher.stop()
        await limiter.backend.close()

    server.stop = stop  # type: ignore[method-assign]
    server.legation_limiter = limiter  # type: ignore[attr-defined]
    server.legation_servicer = servicer  # type: ignore[attr-defined]
    server.legation_watcher = watcher  # type: ignore[attr-defined]
    log.info("rate-limit service on %s:%d (backend %s)", host, port, settings.backend)
    return server, port
