"""The HTTP call-out server: Envoy's ext_authz in HTTP mode, answered by the ext_authz checks.

``start_server(Settings)`` builds the same :class:`~legation.extauthz.servicer.
AuthorizationServicer` as the gRPC service (same config file, checks, metrics, decision log)
and serves it over HTTP/1.1 with :mod:`legation.fastpath._http` (httptools, on the caller's
loop: ``legation serve`` runs it on uvloop, :mod:`legation._loop`). Per call: the HTTP request
is read as the ``CheckRequest`` gRPC would carry (:mod:`legation.fastpath.request`: the checks
see the same fields and policy input, without the message being built unless a check asks for
it), the servicer decides
(:meth:`AuthorizationServicer.decide`, so dry-run, fail-closed errors and timeouts are the gRPC
path's), and the decision becomes the HTTP answer Envoy applies (:mod:`legation.fastpath.answer`).
With ``tls`` it serves mutual TLS (:mod:`legation.fastpath._tls`), following a certificate
source as the gRPC services do.

``upstream_headers`` and ``client_headers`` must be the ones the filter was built with
(:class:`legation.fastpath.envoy_filter.Callout`): a decision that names another header is
denied with ``error_status`` rather than passed on without it.
"""

from __future__ import annotations

from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from legation.errors import ConfigError
from legation.extauthz import service as authz
from legation.extauthz.observe import TRACER
from legation.extauthz.request import RequestContext
from legation.extauthz.servicer import AuthorizationServicer
from legation.fastpath import answer
from legation.fastpath._http import Call, Limits, Listening, listen
from legation.fastpath.contract import REMOTE_ADDRESS_HEADER, ROUTE_HEADER, Forwarded
from legation.fastpath.fused import FusedDecider
from legation.fastpath.request import CallContext, NotACheck, read_call
from legation.grpc_server import ServerTls, TlsSource


@dataclass(frozen=True, kw_only=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 0
    reuse_port: bool = False
    path: str | None = None  # a Unix socket to listen on instead of host:port
    config_file: Path | None = None  # the ext_authz service's config (same file, same checks)
    config: dict[str, Any] | None = None  # the same document, inline
    decision_log: str | None = None
    registry: CollectorRegistry | None = None
    upstream_headers: Sequence[str] = ()  # as the filter's Callout.upstream_headers
    client_headers: Sequence[str] = ()  # as the filter's Callout.client_headers
    limits: Limits = field(default_factory=Limits)
    tls: ServerTls | TlsSource | None = None  # None: plaintext; mutual TLS as the gRPC services
    fused: FusedDecider | None = None  # fused decisions (rate limits, routing) for named routes


class CalloutApp:
    """Call -> answer bytes, around one servicer (swapped configs apply from the next call)."""

    def __init__(
        self,
        servicer: AuthorizationServicer,
        *,
        upstream_headers: Sequence[str] = (),
        client_headers: Sequence[str] = (),
        fused: FusedDecider | None = None,
    ) -> None:
        self.servicer = servicer
        self.validate = answer.validator(Forwarded(upstream_headers), client_headers)
        self.fused = fused

    def __call__(self, call: Call) -> bytes | Coroutine[Any, Any, bytes]:
        extra: dict[str, str] = {}
        try:
            request = read_call(call.method, call.target, call.headers, call.body, extra)
        except NotACheck:
            return answer.error(400, "not_a_check", keep_alive=call.keep_alive)
        ctx = CallContext(request, self.servicer.input_options)
        name = extra.get(ROUTE_HEADER)
        parent = _parent(call.headers) if TRACER.on else None
        if name is None:
            return self._answer(ctx, call.keep_alive, parent)
        route = self.fused.routes.get(name) if self.fused is not None else None
        if route is None:  # never an allow without the route's decisions
            return answer.error(403, "unknown_route", keep_alive=call.keep_alive)
        assert self.fused is not None
        return self.fused.decide(
            self.servicer,
            route,
            ctx,
            extra.get(REMOTE_ADDRESS_HEADER),
            self.validate,
            call.keep_alive,
            parent,
        )

    async def _answer(self, ctx: RequestContext, keep_alive: bool, parent: Any) -> bytes:
        decision, _ = await self.servicer.decide(
            ctx, validate=self.validate, parent=parent, transport="http"
        )
        return answer.encode(
            decision, deny_status=self.servicer.config.deny_status, keep_alive=keep_alive
        )


class CalloutServer:
    """A running server: ``port`` (or ``path``, its Unix socket), ``servicer`` (for reloads),
    ``close()``. ``owns_checks``: ``close()`` also closes the servicer's checks (False when it
    shares a gRPC server's)."""

    def __init__(
        self, listening: Listening, servicer: AuthorizationServicer, *, owns_checks: bool = True
    ) -> None:
        self.listening = listening
        self.server = listening.server
        self.servicer = servicer
        self.port = listening.port
        self.path = listening.path
        self.owns_checks = owns_checks

    async def serve_forever(self) -> None:
        await self.server.serve_forever()

    async def close(self) -> None:
        """Stop listening and close the open connections too (Envoy keeps them alive: a stopped
        service must stop answering, so Envoy's failure mode applies)."""
        await self.listening.close()
        if self.owns_checks:
            await authz.close_checks(self.servicer)


async def start_server(settings: Settings) -> CalloutServer:
    """A server with its own servicer, built from ``settings``' config."""
    servicer = await authz.build_servicer(
        authz.Settings(
            config_file=settings.config_file,
            config=settings.config,
            decision_log=settings.decision_log,
            registry=settings.registry,
        )
    )
    try:
        return await serve(servicer, settings, owns_checks=True)
    except BaseException:
        await authz.close_checks(servicer)
        raise


async def serve(
    servicer: AuthorizationServicer, settings: Settings, *, owns_checks: bool = False
) -> CalloutServer:
    """Serve ``servicer`` (e.g. the gRPC server's: same checks, and a config swapped into it
    applies here from the next call) on ``settings``' address; ``settings``' config fields are
    not read. Raises ConfigError for a config whose statuses would allow over HTTP, OSError when
    the address cannot be bound."""
    for name in ("deny_status", "error_status"):
        if getattr(servicer.config, name) == 200:
            where = settings.config_file or "<settings.config>"
            raise ConfigError(f"{where}: {name}: 200 would allow the request in Envoy's HTTP mode")
    app = CalloutApp(
        servicer,
        upstream_headers=settings.upstream_headers,
        client_headers=settings.client_headers,
        fused=settings.fused,
    )
    listening = await listen(
        app,
        host=settings.host,
        port=settings.port,
        limits=settings.limits,
        tls=settings.tls,
        reuse_port=settings.reuse_port,
        path=settings.path,
    )
    return CalloutServer(listening, servicer, owns_checks=owns_checks)


def _parent(headers: Sequence[tuple[bytes, bytes]]) -> Any:
    """The sampled Envoy span in the call's ``traceparent`` header (Envoy's tracer adds it to
    the call it makes), or None."""
    for name, value in headers:
        if len(name) == 11 and name.lower() == b"traceparent":
            return TRACER.parent(value.decode("latin-1"))
    return None
