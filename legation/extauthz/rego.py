"""The ``rego`` check: the embedded regopy engine evaluating compiled, hot-reloaded policies.

The route names its policy in ``context_extensions["policy"]`` as a package (``envoy.authz``,
evaluated at its ``decision`` rule, ``allow`` by default, as opa-envoy-plugin's
``data.envoy.authz.allow``) or as an explicit ``package/path/rule``. The result is read by
:func:`~legation.extauthz.response.decision_from_result`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from regopy import Input, Interpreter, RegoError

from legation.errors import ConfigError
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


def entrypoint(policy: str, decision: str) -> str:
    if "/" in policy:
        return policy.strip("/")
    return policy.replace(".", "/") + "/" + decision


class RegoCheck:
    name = "rego"

    def __init__(self, config: RegoConfig) -> None:
        self.config = config
        self.store = PolicyStore(config.policy_dir, rules=(config.decision,),
                                 interval_s=config.reload_interval_s)
        self._interp: tuple[CompiledPolicies, Interpreter] | None = None

    def _interpreter(self) -> tuple[CompiledPolicies, Interpreter]:
        compiled = self.store.current
        if self._interp is None or self._interp[0] is not compiled:
            self._interp = (compiled, Interpreter())
        return self._interp

    async def check(self, ctx: RequestContext) -> Decision:
        policy = ctx.extensions.get("policy") or self.config.default_policy
        if not policy:
            raise AuthzError("rego: the route names no policy and no default_policy is set",
                             code="no_policy")
        return self.evaluate(policy, ctx.input())

    def evaluate(self, policy: str, document: dict[str, Any]) -> Decision:
        compiled, interp = self._interpreter()
        ep = entrypoint(policy, self.config.decision)
        if ep not in compiled.entrypoints:
            raise AuthzError(f"rego: unknown policy {policy!r}", code="unknown_policy")
        try:
            interp.set_input(Input(document))
            output = interp.query_bundle_entrypoint(compiled.bundle, ep)
        except RegoError as e:
            raise AuthzError(f"rego: {policy}: evaluation failed: {e}",
                             code="policy_error") from None
        if not output.ok():
            raise AuthzError(f"rego: {policy}: evaluation failed", code="policy_error")
        text = str(output)
        result = None if text == "undefined" else json.loads(text)["expressions"][0]
        decision = decision_from_result(result, where=f"policy {policy}")
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
