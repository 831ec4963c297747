"""The ``rego`` check: the embedded regopy engine evaluating compiled, hot-reloaded policies.

The route names its policy in ``context_extensions["policy"]`` as a package (``envoy.authz``,
evaluated at its ``decision`` rule, ``allow`` by default, as opa-envoy-plugin's
``data.envoy.authz.allow``) or as an explicit ``package/path/rule``. The result is read by
:func:`~legation.extauthz.response.decision_from_result`.

Per call: the input parts the bundle can read (``project_input``, see
:mod:`legation.extauthz._inputrefs`) go to one interpreter per bundle version, the compiled entry
point is queried, and the result text maps to a cached :class:`Decision` (results repeat).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from regopy import Interpreter, RegoError

from legation.errors import ConfigError
from legation.extauthz import _regofast
from legation.extauthz.checks import Decision
from legation.extauthz.config import pydantic_error
from legation.extauthz.errors import AuthzError
from legation.extauthz.policies import CompiledPolicies, PolicyStore
from legation.extauthz.request import RequestContext
from legation.extauthz.response import decision_from_result


class RegoConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    policy_dir: Path = Path("policies")
    decision: str = Field(default="allow", pattern=r"^[A-Za-z_]\w*$")
    default_policy: str | None = None
    reload_interval_s: float = Field(default=1.0, ge=0)
    # send the engine only the input parts the policies reference (input.a.b refs); a bundle
    # that uses `input` as a whole value always gets the whole document
    project_input: bool = True
    probe_timeout_s: float = Field(default=10.0, gt=0, le=120)
    # load *_test.rego files into the serving bundle too (`legation policy test` always does)
    include_tests: bool = False


def entrypoint(policy: str, decision: str) -> str:
    if "/" in policy:
        return policy.strip("/")
    return policy.replace(".", "/") + "/" + decision


_RESULT_CACHE = 4096


class RegoCheck:
    name = "rego"

    def __init__(self, config: RegoConfig) -> None:
        self.config = config
        self.store = PolicyStore(config.policy_dir, rules=(config.decision,),
                                 interval_s=config.reload_interval_s,
                                 probe_timeout_s=config.probe_timeout_s,
                                 tests=config.include_tests)
        self._compiled: CompiledPolicies | None = None
        self._interp = Interpreter()
        # policy -> (entry point, input parts it reads), or None when not compiled
        self._entrypoints: dict[str, tuple[bytes, Any] | None] = {}
        self._decisions: dict[tuple[str, str], Decision] = {}  # (policy, result text) ->

    def _current(self) -> CompiledPolicies:
        compiled = self.store.current
        if compiled is not self._compiled:  # a reload swapped the bundle: start afresh
            self._compiled = compiled
            self._interp = Interpreter()
            self._entrypoints.clear()
            self._decisions.clear()
        return compiled

    def _entrypoint(self, compiled: CompiledPolicies, policy: str) -> tuple[bytes, Any]:
        if policy in self._entrypoints:
            found = self._entrypoints[policy]
        else:
            name = entrypoint(policy, self.config.decision)
            found = None
            if name in compiled.entrypoints:
                only = compiled.input_paths.get(name.rsplit("/", 1)[0])
                found = (name.encode(), only if self.config.project_input else None)
            if len(self._entrypoints) < _RESULT_CACHE:
                self._entrypoints[policy] = found
        if found is None:
            raise AuthzError(f"rego: unknown policy {policy!r}", code="unknown_policy")
        return found

    async def check(self, ctx: RequestContext) -> Decision:
        policy = ctx.extensions.get("policy") or self.config.default_policy
        if not policy:
            raise AuthzError("rego: the route names no policy and no default_policy is set",
                             code="no_policy")
        compiled = self._current()
        ep, only = self._entrypoint(compiled, policy)
        return self._evaluate(compiled, policy, ep, ctx.input(only))

    def evaluate(self, policy: str, document: dict[str, Any]) -> Decision:
        compiled = self._current()
        return self._evaluate(compiled, policy, self._entrypoint(compiled, policy)[0], document)

    def _evaluate(self, compiled: CompiledPolicies, policy: str, ep: bytes,
                  document: dict[str, Any]) -> Decision:
        try:
            _regofast.set_input(self._interp, document)
            ok, text = _regofast.query(self._interp, compiled.bundle, ep)
        except (RegoError, TypeError) as e:
            raise AuthzError(f"rego: {policy}: evaluation failed: {e}",
                             code="policy_error") from None
        if not ok:
            raise AuthzError(f"rego: {policy}: evaluation failed", code="policy_error")
        key = (policy, text)
        decision = self._decisions.get(key)
        if decision is None:
            result = None if text == "undefined" else json.loads(text)["expressions"][0]
            decision = decision_from_result(result, where=f"policy {policy}")
            if len(self._decisions) >= _RESULT_CACHE:
                self._decisions.clear()
            self._decisions[key] = decision
        return decision

    async def start(self) -> None:
        self.store.start()

    async def close(self) -> None:
        await self.store.close()


class RegoCheckFactory:
    name = "rego"

    def validate(self, raw: Any) -> RegoConfig:
        try:
            config = RegoConfig.model_validate(raw)
        except ValidationError as e:
            raise ConfigError(pydantic_error(e)) from None
        if not config.policy_dir.is_dir():
            raise ConfigError(f"policy_dir: {config.policy_dir} is not a directory")
        return config

    def create(self, config: RegoConfig) -> RegoCheck:
        return RegoCheck(config)
