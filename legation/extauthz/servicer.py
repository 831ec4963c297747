"""``envoy.service.auth.v3.Authorization/Check``: runs the route's checks and answers Envoy.

This is the one boundary where :class:`~legation.extauthz.errors.AuthzError` codes become HTTP
statuses, decision-log results and metric labels. Whatever happens inside a check, Envoy gets a
well-formed CheckResponse: an error or a timeout denies with ``error_status`` (fail closed).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import Any

from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc

from legation.extauthz.checks import Check, Decision
from legation.extauthz.config import ServiceConfig
from legation.extauthz.errors import CLIENT_CODES, AuthzError
from legation.extauthz.observe import DecisionLog, Metrics
from legation.extauthz.request import RequestContext
from legation.extauthz.response import to_check_response

log = logging.getLogger("legation.extauthz")


class AuthorizationServicer(external_auth_pb2_grpc.AuthorizationServicer):
    def __init__(
        self,
        *,
        config: ServiceConfig,
        checks: Mapping[str, Check],
        metrics: Metrics,
        decision_log: DecisionLog,
    ) -> None:
        self.config = config
        self.checks = dict(checks)
        self.metrics = metrics
        self.decision_log = decision_log
        self._timeout = config.check_timeout_ms / 1000
        self._dry_run = frozenset(config.dry_run)
        self._default_checks = tuple(config.default_checks)

    async def Check(
        self, request: external_auth_pb2.CheckRequest, context: Any
    ) -> external_auth_pb2.CheckResponse:
        started = time.perf_counter()
        ctx = RequestContext(request)
        policy = ctx.extensions.get("policy") or self.config.default_policy or "-"
        names = self._names(ctx)
        dry_run = policy in self._dry_run
        code = ""
        try:
            decision = await self._run(ctx, names)
            if not decision.allowed:
                code = "denied"
        except AuthzError as e:
            code = e.code
            status = e.status or (self.config.deny_status if e.is_client_error
                                  else self.config.error_status)
            decision = Decision(allowed=False, http_status=status, reason=str(e),
                                body=f'{{"error":"{e.code}"}}',
                                headers={"content-type": "application/json"})
        except TimeoutError:
            code = "timeout"
            decision = Decision(allowed=False, http_status=self.config.error_status,
                                reason="a check timed out", body='{"error":"timeout"}',
                                headers={"content-type": "application/json"})
        except Exception:
            log.exception("check chain failed (decision %s)", ctx.decision_id)
            code = "internal"
            decision = Decision(allowed=False, http_status=self.config.error_status,
                                reason="internal error", body='{"error":"internal"}',
                                headers={"content-type": "application/json"})
        result = "allow" if decision.allowed else ("deny" if code == "denied" or
                                                   code in CLIENT_CODES else "error")
        if not decision.allowed and dry_run:
            result = "would_deny"
            log.warning("dry-run policy %s would deny (decision %s): %s", policy,
                        ctx.decision_id, decision.reason)
            decision = Decision(allowed=True, headers={}, dynamic_metadata={"dry_run": True})
        response = to_check_response(
            decision, decision_id=ctx.decision_id, deny_status=self.config.deny_status,
            metadata={"policy": policy},
        )
        elapsed = time.perf_counter() - started
        self.metrics.observe(policy=policy, result=result, code=code, seconds=elapsed)
        if self.decision_log.enabled:
            self.decision_log.write({
                "decision_id": ctx.decision_id,
                "policy": policy,
                "checks": list(names),
                "result": result,
                "code": code or None,
                "http_status": None if decision.allowed else
                (decision.http_status or self.config.deny_status),
                "reason": decision.reason or None,
                "dry_run": dry_run,
                "method": ctx.method,
                "path": ctx.path.split("?", 1)[0],
                "latency_ms": round(elapsed * 1000, 3),
            })
        return response

    def _names(self, ctx: RequestContext) -> tuple[str, ...]:
        raw = ctx.extensions.get("checks")
        if raw is None:
            return self._default_checks
        return tuple(n.strip() for n in raw.split(",") if n.strip())

    async def _run(self, ctx: RequestContext, names: tuple[str, ...]) -> Decision:
        if not names:
            raise AuthzError("the route names no checks and there are no default_checks",
                             code="no_checks")
        headers: dict[str, str] = {}
        response_headers: dict[str, str] = {}
        remove: list[str] = []
        metadata: dict[str, Any] = {}
        for name in names:
            check = self.checks.get(name)
            if check is None:
                raise AuthzError(f"the route names unknown check {name!r}", code="unknown_check")
            decision = await asyncio.wait_for(check.check(ctx), self._timeout)
            if not decision.allowed:
                return decision
            headers.update(decision.headers)
            response_headers.update(decision.response_headers_to_add)
            remove.extend(decision.request_headers_to_remove)
            metadata.update(decision.dynamic_metadata)
        return Decision(allowed=True, headers=headers, response_headers_to_add=response_headers,
                        request_headers_to_remove=tuple(remove), dynamic_metadata=metadata)
