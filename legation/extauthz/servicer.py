"""``envoy.service.auth.v3.Authorization/Check``: runs the route's checks and answers Envoy.

This is the one boundary where :class:`~legation.extauthz.errors.AuthzError` codes become HTTP
statuses, decision-log results and metric labels. Whatever happens inside a check, Envoy gets a
well-formed CheckResponse: an error or a timeout denies with ``error_status`` (fail closed).

The handler is the hot path (Python gRPC leaves ~250 us per call on this hardware), so it does
little per call: no task or timer for a check that finishes without waiting (a cached JWT, an
embedded policy), metric children and parsed route settings cached, no per-request logging.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc

# the gRPC method is named Check too: the plugin type goes by another name in this module
from legation.extauthz._stepping import Waiting, bounded, finish, first_step
from legation.extauthz.checks import Check as CheckPlugin
from legation.extauthz.checks import Decision, Headers, header_items
from legation.extauthz.config import ServiceConfig
from legation.extauthz.errors import CLIENT_CODES, AuthzError
from legation.extauthz.observe import (
    TRACER,
    DecisionLog,
    Metrics,
    service_policy_labels,
    trace_decision,
)
from legation.extauthz.request import InputOptions, RequestContext
from legation.extauthz.response import (
    allow_wire,
    check_decision,
    plain_allow,
    to_check_response,
)
from legation.tracing.spans import SpanContext

log = logging.getLogger("legation.extauthz")


class AuthorizationServicer(external_auth_pb2_grpc.AuthorizationServicer):
    def __init__(
        self,
        *,
        config: ServiceConfig,
        checks: Mapping[str, CheckPlugin],
        metrics: Metrics,
        decision_log: DecisionLog,
        input_options: InputOptions | None = None,
    ) -> None:
        self.metrics = metrics
        self.swap(
            config=config, checks=checks, decision_log=decision_log, input_options=input_options
        )

    def swap(
        self,
        *,
        config: ServiceConfig,
        checks: Mapping[str, CheckPlugin],
        decision_log: DecisionLog,
        input_options: InputOptions | None = None,
    ) -> None:
        """Serve with a new config and checks from the next call on (a config file reload). A
        call in flight finishes with the checks it started with; closing the old checks is the
        caller's business (after a grace period)."""
        self.config = config
        self.input_options = input_options  # skip_body_parse, proto_set (opa-envoy-plugin's)
        self.checks = dict(checks)
        self.metrics.bound_policies(service_policy_labels(config, self.checks))  # bounded series
        self.decision_log = decision_log
        self._timeout = config.check_timeout_ms / 1000
        self._dry_run = frozenset(config.dry_run)
        self._default_checks = tuple(config.default_checks)
        self._default_policy = config.default_policy or "-"
        self._parsed: dict[str, tuple[str, ...]] = {}  # context_extensions["checks"] -> names

    async def Check(
        self, request: external_auth_pb2.CheckRequest, context: Any
    ) -> external_auth_pb2.CheckResponse:
        """The answer as a message (for Python callers; the server sends :meth:`check_wire`'s,
        which this parses when it is bytes, so both are the same answer)."""
        answer = await self.check_wire(request, context)
        if isinstance(answer, bytes):
            return external_auth_pb2.CheckResponse.FromString(answer)
        return answer

    async def check_wire(
        self, request: external_auth_pb2.CheckRequest, context: Any
    ) -> external_auth_pb2.CheckResponse | bytes:
        """What the gRPC server answers ``Check`` with: the common plain allow already
        serialized (:func:`allow_wire`), anything else as a message."""
        ctx = RequestContext(request, self.input_options)
        parent = TRACER.parent_in(context.invocation_metadata()) if TRACER.on else None
        decision, policy = await self.decide(ctx, parent=parent)
        if plain_allow(decision):
            try:
                return allow_wire(policy, ctx.decision_id)
            except UnicodeEncodeError:  # a policy name no proto could carry: the message path
                pass
        return to_check_response(
            decision,
            decision_id=ctx.decision_id,
            deny_status=self.config.deny_status,
            policy=policy,
        )

    async def decide(
        self,
        ctx: RequestContext,
        *,
        validate: Callable[[Decision], None] | None = None,
        parent: SpanContext | None = None,
        transport: str = "grpc",
    ) -> tuple[Decision, str]:
        """Run the route's checks on ``ctx`` and return the decision to answer with and the
        policy label. Never raises: an error or a timeout is a denial with ``error_status``
        (fail closed), a client error one with ``deny_status``; dry-run, the metric and the
        decision log are applied here. ``validate`` (the HTTP call-out's) may raise
        :class:`AuthzError` to refuse a decision its transport cannot carry. With ``parent``
        (the calling Envoy span, sampled) a span records the decision. Shared by the gRPC
        ``Check`` and :mod:`legation.fastpath`, so both decide alike."""
        started = time.perf_counter()
        extensions = ctx.extensions
        policy = extensions.get("policy") or self._default_policy
        names = self._names(extensions.get("checks"))
        code = ""
        try:
            if len(names) == 1:  # most routes: one check, stepped here (no frame of _run)
                coro = self._check(names[0]).check(ctx)
                step = first_step(coro)
                decision = (
                    await finish(coro, step, self._timeout) if isinstance(step, Waiting) else step
                )
            else:
                decision = await self._run(ctx, names)
            check_decision(decision)  # no CR/LF/NUL header reaches Envoy, whoever built it
            if validate is not None:
                validate(decision)
            if not decision.allowed:
                code = "denied"
        except AuthzError as e:
            code = e.code
            status = e.status or (
                self.config.deny_status if e.is_client_error else self.config.error_status
            )
            decision = Decision(
                allowed=False,
                http_status=status,
                reason=str(e),
                body=f'{{"error":"{e.code}"}}',
                headers=_JSON,
            )
        except TimeoutError:
            code = "timeout"
            decision = Decision(
                allowed=False,
                http_status=self.config.error_status,
                reason="a check timed out",
                body='{"error":"timeout"}',
                headers=_JSON,
            )
        except Exception:
            log.exception("check chain failed (decision %s)", ctx.decision_id)
            code = "internal"
            decision = Decision(
                allowed=False,
                http_status=self.config.error_status,
                reason="internal error",
                body='{"error":"internal"}',
                headers=_JSON,
            )
        result = (
            "allow"
            if decision.allowed
            else ("deny" if code == "denied" or code in CLIENT_CODES else "error")
        )
        dry_run = policy in self._dry_run
        if not decision.allowed and dry_run:
            result = "would_deny"  # the decision log and the metric make it visible
            log.debug(
                "dry-run policy %s would deny (decision %s): %s",
                policy,
                ctx.decision_id,
                decision.reason,
            )
            # as opa-envoy-plugin: allowed, no mutation, the policy's metadata kept
            decision = Decision(
                allowed=True, dynamic_metadata={**decision.dynamic_metadata, "dry_run": True}
            )
        elapsed = time.perf_counter() - started
        self.metrics.observe(policy=policy, result=result, code=code, seconds=elapsed)
        if parent is not None:
            trace_decision(parent, elapsed, result, policy, names, code, transport)
        if self.decision_log.enabled:
            self.decision_log.write(
                {
                    "decision_id": ctx.decision_id,
                    "policy": policy,
                    "checks": list(names),
                    "result": result,
                    "code": code or None,
                    "http_status": None
                    if decision.allowed
                    else (decision.http_status or self.config.deny_status),
                    "reason": decision.reason or None,
                    "dry_run": dry_run,
                    "method": ctx.method,
                    "path": ctx.path.split("?", 1)[0],
                    "latency_ms": round(elapsed * 1000, 3),
                }
            )
        return decision, policy

    def _names(self, raw: str | None) -> tuple[str, ...]:
        if raw is None:
            return self._default_checks
        names = self._parsed.get(raw)
        if names is None:
            names = tuple(n.strip() for n in raw.split(",") if n.strip())
            if len(self._parsed) < 1024:  # routes are few; a bounded cache all the same
                self._parsed[raw] = names
        return names

    async def _run(self, ctx: RequestContext, names: tuple[str, ...]) -> Decision:
        if not names:
            raise AuthzError(
                "the route names no checks and there are no default_checks", code="no_checks"
            )
        if len(names) == 1:
            return await bounded(self._check(names[0]).check(ctx), self._timeout)
        headers: list[tuple[str, str]] = []
        response_headers: list[tuple[str, str]] = []
        remove: list[str] = []
        query_set: list[tuple[str, str]] = []
        query_remove: list[str] = []
        metadata: dict[str, Any] = {}
        for name in names:
            decision = await bounded(self._check(name).check(ctx), self._timeout)
            if not decision.allowed:
                return decision
            # most checks allow with nothing to add: test before calling (the hot path)
            if decision.headers:  # a later check's header wins, all its values
                _replace(headers, decision.headers)
            if decision.response_headers_to_add:
                _replace(response_headers, decision.response_headers_to_add)
            if decision.request_headers_to_remove:
                remove.extend(decision.request_headers_to_remove)
            if decision.query_parameters_to_set:
                query_set.extend(decision.query_parameters_to_set)
            if decision.query_parameters_to_remove:
                query_remove.extend(decision.query_parameters_to_remove)
            if decision.dynamic_metadata:
                metadata.update(decision.dynamic_metadata)
        return Decision(
            allowed=True,
            headers=tuple(headers),
            response_headers_to_add=tuple(response_headers),
            request_headers_to_remove=tuple(remove),
            query_parameters_to_set=tuple(query_set),
            query_parameters_to_remove=tuple(query_remove),
            dynamic_metadata=metadata,
        )

    def _check(self, name: str) -> CheckPlugin:
        check = self.checks.get(name)
        if check is None:
            raise AuthzError(f"the route names unknown check {name!r}", code="unknown_check")
        return check


_JSON = {"content-type": "application/json"}


def _replace(acc: list[tuple[str, str]], headers: Headers) -> None:
    """Add ``headers`` to ``acc``, dropping what ``acc`` had under the same names."""
    pairs = list(header_items(headers))
    if pairs:
        names = {name.lower() for name, _ in pairs}
        acc[:] = [p for p in acc if p[0].lower() not in names] + pairs
