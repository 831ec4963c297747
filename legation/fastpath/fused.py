"""Fused decisions: one HTTP call decides a route's authz, header routing and rate limits.

A fused route's metadata names it, which the fused filter sends in :data:`~legation.fastpath.
contract.ROUTE_HEADER` (Envoy sets it; a client's ``x-legation-*`` never reaches the call-out). The
:class:`FusedRoutes` table (swapped live with the mesh) says what the route asks for; per call,
in Envoy's filter order:

1. authz: the servicer's :meth:`~legation.extauthz.servicer.AuthorizationServicer.decide`, as
   any HTTP call-out (skipped when the route has no policy); a denial answers at once, nothing
   counted;
2. routing: the route's ``header_route`` filters choose the routing header from the client's
   headers, as ext_proc runs them; the answer always sets it, or removes it
   (``x-envoy-auth-headers-to-remove``), whatever the client sent, and the fused filter's
   ``clear_route_cache`` makes Envoy match the routes again;
3. rate limits: the descriptors built from the headers *after* routing
   (:mod:`legation.fastpath.descriptors`) go to the same
   :class:`~legation.ratelimit.service.RateLimitServicer` boundary as gRPC's ``ShouldRateLimit``
   (same limiter code, failure mode and store): over the limit is a 429 with
   ``x-envoy-ratelimited`` and the ``x-ratelimit-*`` headers, as Envoy's rate-limit filter
   answers; under it, the ``x-ratelimit-*`` headers go on the client's response. A store down
   with ``failure_mode: deny`` is a 5xx answer, which Envoy reads as a failed call (the fused
   filter's failure mode then decides, closed for such a route).

An unknown route name (a route Envoy has and this server has not learnt yet, or a forged call)
is refused with 403: never an allow without the route's decisions.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from envoy.service.ratelimit.v3 import rls_pb2

from legation.extauthz.checks import ALLOW, Decision, header_items
from legation.extauthz.request import RequestContext
from legation.extproc.exchange import Exchange
from legation.fastpath import answer
from legation.fastpath.descriptors import Entry, rate_limit_request, x_ratelimit_headers
from legation.ratelimit.backends.memory import MemoryBackend
from legation.ratelimit.errors import RateLimitError
from legation.ratelimit.service import trace_decision

if TYPE_CHECKING:
    from legation.extauthz.servicer import AuthorizationServicer
    from legation.ratelimit.service import RateLimitServicer

__all__ = ["FusedDecider", "FusedRoute", "FusedRoutes"]

_OVER = rls_pb2.RateLimitResponse.OVER_LIMIT
_RATELIMITED = ("x-envoy-ratelimited", "true")


@dataclass(frozen=True)
class FusedRoute:
    """One route's fused work: its policy (None: no authz), routing filters, descriptors."""

    name: str
    authz: str | None
    routing: tuple[Any, ...]  # HeaderRoute filters
    descriptors: tuple[tuple[Entry, ...], ...]

    def route(self, headers: dict[str, str]) -> tuple[list[tuple[str, str]], list[str]]:
        """Run the routing filters on ``headers`` (changed in place, as ext_proc's view of the
        request is); the headers to set and to remove."""
        if not self.routing:
            return [], []
        ex = Exchange(self.name, request_headers=headers)
        changed: dict[str, str | None] = {}
        for f in self.routing:
            value = f.choose(ex)
            name = f.options.header.lower()
            if value is None:
                headers.pop(name, None)
            else:
                headers[name] = value
            changed[name] = value
        return (
            [(n, v) for n, v in changed.items() if v is not None],
            [n for n, v in changed.items() if v is None],
        )


class FusedRoutes:
    """The table of fused routes, swapped as a whole; the previous generation still answers for
    routes the new one dropped, while Envoy may still send them (make-before-break)."""

    def __init__(self, routes: Mapping[str, FusedRoute] | None = None) -> None:
        self.current: Mapping[str, FusedRoute] = dict(routes or {})
        self.previous: Mapping[str, FusedRoute] = {}

    def swap(self, routes: Mapping[str, FusedRoute]) -> None:
        self.previous, self.current = self.current, dict(routes)

    def get(self, name: str) -> FusedRoute | None:
        return self.current.get(name) or self.previous.get(name)


class FusedDecider:
    """Decides fused calls: authz with the servicer, rate limits with ``limits`` (the rate-limit
    servicer's decision boundary) in ``domain``."""

    def __init__(
        self,
        routes: FusedRoutes,
        *,
        limits: RateLimitServicer | None = None,
        domain: str = "",
    ) -> None:
        self.routes = routes
        self.limits = limits
        self.domain = domain

    async def decide(
        self,
        servicer: AuthorizationServicer,
        route: FusedRoute,
        ctx: RequestContext,
        remote: str | None,
        validate: Any,
        keep_alive: bool,
        parent: Any = None,
    ) -> bytes:
        """``parent``: the calling Envoy span when sampled: the authz decision and the
        rate-limit decision each record a span under it, as their gRPC services do."""
        deny_status = servicer.config.deny_status
        decision = ALLOW
        if route.authz is not None:
            decision, _ = await servicer.decide(
                ctx, validate=validate, parent=parent, transport="http"
            )
            if not decision.allowed:
                return answer.encode(decision, deny_status=deny_status, keep_alive=keep_alive)
        # what the next filters see on the gRPC chain (ext_authz, then ext_proc, then the rate
        # limit): the request as the authz decision left it, e.g. a JWT check's verified
        # claims_to_headers, never the client's own value of such a header
        headers = _after(decision, ctx.headers)
        to_set, to_remove = route.route(headers)
        limit_headers: list[tuple[str, str]] = []
        if route.descriptors:
            request = rate_limit_request(self.domain, route.descriptors, headers, remote)
            if request is not None:
                if self.limits is None:
                    return answer.error(503, "no_rate_limits", keep_alive=keep_alive)
                if not isinstance(self.limits.limiter.backend, MemoryBackend):
                    # a store over the network waits (and times out): from here on run in a
                    # task (the HTTP connection steps this coroutine by hand until it yields)
                    await asyncio.sleep(0)
                start, response = time.time_ns(), None
                try:
                    response = await self.limits.decide(request)
                except RateLimitError:  # a request the limiter refuses: a failed call
                    return answer.error(503, "invalid_descriptor", keep_alive=keep_alive)
                finally:
                    if parent is not None:
                        ok = isinstance(response, rls_pb2.RateLimitResponse)
                        trace_decision(parent, start, request, response if ok else None)
                if not isinstance(response, rls_pb2.RateLimitResponse):
                    return answer.error(503, "rate_limit_store", keep_alive=keep_alive)
                limit_headers = x_ratelimit_headers(response)
                limit_headers += [(h.key, h.value) for h in response.response_headers_to_add]
                if response.overall_code == _OVER:
                    over = Decision(
                        allowed=False, http_status=429, headers=[_RATELIMITED, *limit_headers]
                    )
                    return _encode(over, deny_status, keep_alive)
        if not (to_set or to_remove or limit_headers):
            return answer.encode(decision, deny_status=deny_status, keep_alive=keep_alive)
        fused = Decision(
            allowed=True,
            headers=[*header_items(decision.headers), *to_set],
            request_headers_to_remove=(*decision.request_headers_to_remove, *to_remove),
            response_headers_to_add=[
                *header_items(decision.response_headers_to_add),
                *limit_headers,
            ],
        )
        return _encode(fused, deny_status, keep_alive)


def _after(decision: Decision, client: Mapping[str, str]) -> dict[str, str]:
    """The request headers once an allowing ``decision`` is applied: its headers set (several
    values of a name joined with a comma, as they reach the upstream), then its removals."""
    headers = dict(client)
    seen: set[str] = set()
    for name, value in header_items(decision.headers):
        key = name.lower()
        headers[key] = f"{headers[key]},{value}" if key in seen else value
        seen.add(key)
    for name in decision.request_headers_to_remove:
        headers.pop(name.lower(), None)
    return headers


def _encode(decision: Decision, deny_status: int, keep_alive: bool) -> bytes:
    """Encode a decision this module built: the authz part was checked by the servicer, the
    routing values when the mesh was planned (:mod:`legation.translate._fused` refuses a value
    with a control character), limit names by :func:`x_ratelimit_headers`, the rest are
    numbers: nothing here can hold CR/LF."""
    return answer.encode(decision, deny_status=deny_status, keep_alive=keep_alive)
