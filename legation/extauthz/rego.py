"""The ``rego`` check: OPA's engine evaluating validated, hot-reloaded policies, out of process.

The route names its policy in ``context_extensions["policy"]`` as a package (``envoy.authz``,
evaluated at its ``decision`` rule, ``allow`` by default, as opa-envoy-plugin's
``data.envoy.authz.allow``) or as an explicit ``package/path/rule``. The result is read by
:func:`~legation.extauthz.response.decision_from_result`.

Per call: the input parts the policies can read (``project_input``, see
:mod:`legation.extauthz._inputrefs`) are encoded as JSON and evaluated by one of the version's
evaluator processes (:mod:`legation.extauthz.evaluator`); the check's deadline holds because the
wait is cancellable and a late evaluation's process is killed. What comes back is parsed with
duplicate keys refused. Fail closed: an evaluation error (a builtin error such as
``net.cidr_contains("garbage", ...)``, ``1 / 0``, a conflict, a crash, a deadline) is an
AuthzError, never "undefined"; an undefined decision denies.

Decision cache. A policy that reads a few input fields (method, path, a claim) sees the same
projected input over and over, and handing it to the engine and evaluating costs 100-400 us. So
decisions are kept in a bounded LRU (``decision_cache_size``) keyed by the entry point and the
exact projected input (its ``repr``: every str, int, float, bool, None, list and dict renders
distinctly, so two inputs share a key only if the engine would get the same value), and the
whole cache is dropped whenever a new policy version is swapped in. It is used only when it is
safe and useful:

* the package (and every package it reaches through ``data.``) names no nondeterministic builtin
  (``time.now_ns``, ``rand.intn``, ``http.send``, ``io.jwt.decode_verify``, ``print``, ... see
  :data:`~legation.extauthz._inputrefs.NONDETERMINISTIC`): such a policy is evaluated every time;
* the input is projected (a package that reads ``input`` whole sees the request id and time,
  which never repeat);
* the key is short (under ``_MAX_KEY`` characters: large bodies are not kept);
* the input comes from a request (:meth:`RegoCheck.check`); :meth:`RegoCheck.evaluate` with a
  caller's document always evaluates.
Errors are never cached.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from legation.errors import ConfigError
from legation.extauthz.checks import Decision
from legation.extauthz.config import pydantic_error
from legation.extauthz.errors import AuthzError
from legation.extauthz.evaluator import EvaluationError, parse_result
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
    # how long loading a policy version into OPA's engine may take
    probe_timeout_s: float = Field(default=10.0, gt=0, le=120)
    # evaluator processes per policy version: evaluations run in parallel with each other and
    # with the service; one stuck at its deadline is killed and replaced
    evaluators: int = Field(default=2, ge=1, le=64)
    # address space an evaluator process may use (RLIMIT_DATA); past it the engine fails, the
    # request is denied and the process replaced, before the kernel picks a victim
    evaluator_memory_mb: int = Field(default=1024, ge=128, le=65536)
    # http.send and net.lookup_ip_addr: a policy naming them is refused at load unless this is
    # set (the deadline still bounds every call)
    allow_network: bool = False
    # load *_test.rego files into the serving bundle too (`legation policy test` always does)
    include_tests: bool = False
    # decisions kept per policy version, keyed by the exact projected input; 0 turns it off.
    # Policies that use time.now_ns, http.send, ... are never cached (see the module docstring)
    decision_cache_size: int = Field(default=4096, ge=0, le=1_000_000)


def entrypoint(policy: str, decision: str) -> str:
    if "/" in policy:
        return policy.strip("/")
    return policy.replace(".", "/") + "/" + decision


_RESULT_CACHE = 4096
_MAX_KEY = 4096  # characters of projected input beyond which a decision is not cached


class RegoCheck:
    name = "rego"

    def __init__(self, config: RegoConfig) -> None:
        self.config = config
        self.store = PolicyStore(
            config.policy_dir,
            rules=(config.decision,),
            interval_s=config.reload_interval_s,
            probe_timeout_s=config.probe_timeout_s,
            tests=config.include_tests,
            evaluators=config.evaluators,
            evaluator_memory_mb=config.evaluator_memory_mb,
            allow_network=config.allow_network,
        )
        self._compiled: CompiledPolicies | None = None
        # policy -> (data path, input parts it reads, cacheable), or None when not compiled
        self._entrypoints: dict[str, tuple[str, Any, bool] | None] = {}
        self._decisions: dict[tuple[str, str], Decision] = {}  # (policy, result text) ->
        # (data path, repr of the projected input) -> decision, this version only
        self._cache: OrderedDict[tuple[str, str], Decision] = OrderedDict()
        self.cache_hits = 0
        self.cache_misses = 0

    def _current(self) -> CompiledPolicies:
        compiled = self.store.current
        if compiled is not self._compiled:  # a reload swapped the bundle: start afresh
            self._compiled = compiled
            self._entrypoints.clear()
            self._decisions.clear()
            self._cache.clear()
        return compiled

    def policy_names(self) -> frozenset[str]:
        """The packages of the running version (:class:`~legation.extauthz.checks.
        PolicyCatalog`: what bounds the ``policy`` metric label)."""
        return self._current().packages

    def cacheable(self, policy: str) -> bool:
        """Whether decisions of ``policy`` (in the running version) go through the cache."""
        return self._entrypoint(self._current(), policy)[2]

    def _entrypoint(self, compiled: CompiledPolicies, policy: str) -> tuple[str, Any, bool]:
        if policy in self._entrypoints:
            found = self._entrypoints[policy]
        else:
            name = entrypoint(policy, self.config.decision)
            found = None
            if name in compiled.entrypoints:
                package = name.rsplit("/", 1)[0]
                only = compiled.input_paths.get(package) if self.config.project_input else None
                cacheable = (
                    self.config.decision_cache_size > 0
                    and only is not None
                    and compiled.deterministic.get(package, False)
                )
                found = (name.replace("/", "."), only, cacheable)
            if len(self._entrypoints) < _RESULT_CACHE:
                self._entrypoints[policy] = found
        if found is None:
            raise AuthzError(f"rego: unknown policy {policy!r}", code="unknown_policy")
        return found

    async def check(self, ctx: RequestContext) -> Decision:
        policy = ctx.extensions.get("policy") or self.config.default_policy
        if not policy:
            raise AuthzError(
                "rego: the route names no policy and no default_policy is set", code="no_policy"
            )
        compiled = self._current()
        ep, only, cacheable = self._entrypoint(compiled, policy)
        document = ctx.input(only)
        if not cacheable or ctx.body_size() > _MAX_KEY:
            return await self._evaluate(compiled, policy, ep, document)  # no repr of a big body
        text = repr(document)
        if len(text) > _MAX_KEY:
            return await self._evaluate(compiled, policy, ep, document)
        key = (ep, text)
        cache = self._cache
        decision = cache.get(key)
        if decision is not None:
            cache.move_to_end(key)
            self.cache_hits += 1
            return decision
        self.cache_misses += 1
        decision = await self._evaluate(compiled, policy, ep, document)
        if self._compiled is not compiled:  # swapped while evaluating: not for the new version
            return decision
        cache[key] = decision
        if len(cache) > self.config.decision_cache_size:
            cache.popitem(last=False)
        return decision

    async def evaluate(self, policy: str, document: dict[str, Any]) -> Decision:
        """Evaluate ``policy`` with a caller's input document (no projection, no cache)."""
        compiled = self._current()
        ep = self._entrypoint(compiled, policy)[0]
        return await self._evaluate(compiled, policy, ep, document)

    async def _evaluate(
        self, compiled: CompiledPolicies, policy: str, ep: str, document: dict[str, Any]
    ) -> Decision:
        try:
            data = json.dumps(
                document, ensure_ascii=False, separators=(",", ":"), allow_nan=False
            ).encode()
        except (TypeError, ValueError) as e:  # lone surrogates, NaN, a non-JSON value
            raise AuthzError(
                f"rego: {policy}: the input cannot be encoded as JSON: {e}",
                code="policy_input_error",
            ) from None
        try:
            pool = await self.store.pool()
            kind, text = await pool.evaluate(ep, data)
        except EvaluationError as e:
            raise AuthzError(
                f"rego: {policy}: evaluation failed: {e}", code="policy_error"
            ) from None
        except ConfigError as e:  # the pool could not load this version
            raise AuthzError(
                f"rego: {policy}: policy engine unavailable: {e}", code="policy_error"
            ) from None
        key = (policy, text if kind == "v" else "")
        decision = self._decisions.get(key)
        if decision is None:
            try:
                result = parse_result(text) if kind == "v" else None
            except EvaluationError as e:
                raise AuthzError(f"rego: {policy}: {e}", code="invalid_policy_result") from None
            decision = decision_from_result(result, where=f"policy {policy}")
            if len(text) <= _MAX_KEY:  # results that repeat are short; one echoing a body is not
                if len(self._decisions) >= _RESULT_CACHE:
                    self._decisions.clear()
                self._decisions[key] = decision
        return decision

    async def start(self) -> None:
        await self.store.start()

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
