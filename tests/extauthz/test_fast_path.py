"""The request path's shortcuts change nothing a policy or Envoy can see: input projection,
the timer-free check step, decision ids, the metric and decision-log caches; and policies that do
not load, or tests that run away, are caught in evaluator processes (``legation policy test``,
hot reload)."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path
from typing import Any

import pytest
from envoy.service.auth.v3 import external_auth_pb2
from prometheus_client import CollectorRegistry

from legation import plugins
from legation.errors import ConfigError
from legation.extauthz import policy_test
from legation.extauthz._inputrefs import input_paths, input_paths_by_package
from legation.extauthz.checks import ALLOW, Decision, PythonCheck
from legation.extauthz.policies import PolicyStore, load
from legation.extauthz.rego import RegoCheck, RegoConfig
from legation.extauthz.request import RequestContext, build_input, new_decision_id, project
from legation.extauthz.service import Settings, build_servicer, close_checks
from tests.extauthz.conftest import REPO

# `with input as` over a rule that uses another rule: the usual `opa test` style (regopy 1.5.2,
# the engine before OPA's, aborted the process on it)
WITH_TEST = """package crash
import rego.v1

default allow := false
allow if is_get
is_get if input.method == "GET"

test_get if allow with input as {"method": "GET"}
"""

# a module that type-checks only if the engine knows every function it calls
UNKNOWN_FUNCTION = """package broken
import rego.v1

deny if net.cidr_contain("10.0.0.0/8", input.ip)
"""

# runs for minutes: stopped by the per-test deadline
RUNAWAY_TEST = """package slow
import rego.v1

test_forever if count([x | some x in numbers.range(1, 400000000); x % 7 == 0]) > 0
"""


def test_input_refs_bound_what_a_policy_reads() -> None:
    src = """package p
import rego.v1
import input.attributes.source as src
# input.comment is not a ref
allow if input.attributes.request.http.method == "GET"
allow if input["parsed_path"][0] == "x"
allow if input.attributes.request.http.headers[h] == "1"
allow if data.q.input == "field, not the root"
allow if ok with input as {"raw": `input`}
"""
    assert input_paths([src]) == {
        "attributes": {"source": {}, "request": {"http": {"method": {}, "headers": {}}}},
        "parsed_path": {},
    }
    assert input_paths(["package p\nallow := decision(input)"]) is None
    assert input_paths(["package p\nallow if input.a.b\nallow if input.a"]) == {"a": {}}
    by_pkg = input_paths_by_package(
        [
            ("a", "package a\nallow if data.b.x\nallow if input.q"),
            ("b", "package b\nx if input.z"),
            ("c", "package c\nallow := input"),
        ]
    )
    assert by_pkg == {"a": {"q": {}, "z": {}}, "b": {"z": {}}, "c": None}


def test_project_keeps_whole_subtrees_and_skips_missing() -> None:
    doc = {"a": {"b": 1, "c": [1, 2]}, "d": {"e": {"f": 2}}, "g": 3}
    assert project(doc, {"a": {}, "d": {"e": {"x": {}}}, "nope": {}}) == {
        "a": {"b": 1, "c": [1, 2]},
        "d": {"e": {}},
    }


def request(
    path: str, method: str = "GET", policy: str = "envoy.authz", **headers: str
) -> external_auth_pb2.CheckRequest:
    r = external_auth_pb2.CheckRequest()
    h = r.attributes.request.http
    h.method, h.path, h.host = method, path, "svc"
    for k, v in headers.items():
        h.headers[k] = v
    r.attributes.source.address.socket_address.address = "127.0.0.1"
    r.attributes.context_extensions["policy"] = policy
    return r


@pytest.mark.parametrize("role", ["guest", "admin", None])
@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/people"), ("GET", "/people/bob"), ("POST", "/people"), ("DELETE", "/people")],
)
async def test_projected_input_decides_as_the_whole_document(
    role: str | None, method: str, path: str
) -> None:
    checks = [
        RegoCheck(
            RegoConfig(
                policy_dir=REPO / "policies", reload_interval_s=0, project_input=p, evaluators=1
            )
        )
        for p in (True, False)
    ]
    decisions = []
    for check in checks:
        ctx = RequestContext(request(path, method))
        if role:
            ctx.claims, ctx.jwt_provider = {"sub": "alice", "role": role}, "p"
        decisions.append(await check.check(ctx))
        await check.close()
    assert decisions[0] == decisions[1]
    assert decisions[0].allowed == (
        (role == "guest" and path == "/people" and method == "GET")
        or (role == "admin" and method == "GET")
    )


def test_decision_ids_are_unique_32_hex() -> None:
    ids = {new_decision_id() for _ in range(1000)}
    assert len(ids) == 1000 and all(len(i) == 32 and int(i, 16) >= 0 for i in ids)


def test_deeply_nested_json_body_is_a_coded_denial() -> None:
    r = request("/x", "POST", **{"content-type": "application/json"})
    r.attributes.request.http.body = "[" * 100_000
    with pytest.raises(Exception) as err:
        build_input(r)
    assert getattr(err.value, "code", None) == "malformed_body"


class SlowCheck(PythonCheck):
    name = "slow"

    async def check(self, ctx: RequestContext) -> Decision:
        delay = float(ctx.headers.get("x-delay", "0"))
        if delay:
            await asyncio.sleep(delay)  # suspends: the rest runs under the timeout
        if ctx.headers.get("x-fail-after-wait"):
            raise RuntimeError("bug after an await")
        return ALLOW


class SlowFactory:
    name = "slow"

    def validate(self, raw: Any) -> dict[str, Any]:
        return dict(raw)

    def create(self, config: dict[str, Any]) -> SlowCheck:
        return SlowCheck()


async def test_timeout_applies_only_to_checks_that_wait() -> None:
    plugins.register("extauthz.check", SlowFactory())
    try:
        registry = CollectorRegistry()
        servicer = await build_servicer(
            Settings(
                config={
                    "checks": {"slow": {"type": "slow"}},
                    "default_checks": ["slow"],
                    "check_timeout_ms": 200,
                    "error_status": 504,
                },
                registry=registry,
            )
        )
        fast = await servicer.Check(request("/a"), None)
        assert fast.status.code == 0 and len(fast.dynamic_metadata["decision_id"]) == 32
        waits = await servicer.Check(request("/a", **{"x-delay": "0.01"}), None)
        assert waits.status.code == 0
        slow = await servicer.Check(request("/a", **{"x-delay": "5"}), None)
        assert slow.denied_response.status.code == 504
        assert json.loads(slow.denied_response.body) == {"error": "timeout"}
        boom = await servicer.Check(
            request("/a", **{"x-delay": "0.01", "x-fail-after-wait": "1"}), None
        )
        assert json.loads(boom.denied_response.body) == {"error": "internal"}
        assert (
            registry.get_sample_value(
                "legation_extauthz_decisions_total", {"policy": "envoy.authz", "result": "allow"}
            )
            == 2
        )
        assert (
            registry.get_sample_value(
                "legation_extauthz_check_errors_total", {"policy": "envoy.authz", "code": "timeout"}
            )
            == 1
        )
        await close_checks(servicer)
    finally:
        plugins.unregister("extauthz.check", "slow")


def test_policy_test_runs_with_tests_and_stops_a_runaway_one(tmp_path: Path) -> None:
    (tmp_path / "ok.rego").write_text(
        "package ok\nimport rego.v1\nx := 1\ntest_one if x == 1\ntest_two if x == 2\n"
    )
    (tmp_path / "crash.rego").write_text(WITH_TEST)
    (tmp_path / "slow.rego").write_text(RUNAWAY_TEST)
    out = io.StringIO()
    assert policy_test.run(tmp_path, verbose=True, out=out, timeout_s=1.0) == 2
    text = out.getvalue()
    assert "data.crash.test_get: PASS" in text
    assert "data.slow.test_forever: ERROR" in text and "timed out after 1 s" in text
    assert "data.ok.test_one: PASS" in text and "data.ok.test_two: FAIL" in text
    assert "PASS: 2/4" in text and "FAIL: 1/4" in text and "ERROR: 1/4" in text
    (tmp_path / "slow.rego").unlink()
    assert policy_test.main([str(tmp_path)]) == 2  # the CLI exits non-zero on a failure


def test_a_policy_calling_an_unknown_function_is_refused_at_load(tmp_path: Path) -> None:
    (tmp_path / "good.rego").write_text("package good\nimport rego.v1\nallow := true\n")
    (tmp_path / "broken.rego").write_text(UNKNOWN_FUNCTION)
    with pytest.raises(ConfigError) as err:
        load(tmp_path, rules=("allow",), probe_timeout_s=30)
    assert err.value.code == "policy_compile_failed"
    assert str(err.value) == (
        f"{tmp_path / 'broken.rego'}:4: rego_type_error: undefined function net.cidr_contain"
    )


async def test_hot_reload_refuses_a_policy_that_does_not_load(tmp_path: Path) -> None:
    (tmp_path / "p.rego").write_text(
        "package p\nimport rego.v1\ndefault allow := false\n"
        'allow if input.attributes.request.http.method == "GET"\n'
    )
    registry = CollectorRegistry()
    servicer = await build_servicer(
        Settings(
            config={
                "checks": {
                    "authz": {
                        "type": "rego",
                        "options": {"policy_dir": str(tmp_path), "reload_interval_s": 0},
                    }
                },
                "default_checks": ["authz"],
                "default_policy": "p",
            },
            registry=registry,
        )
    )
    store: PolicyStore = servicer.checks["authz"].store  # type: ignore[attr-defined]
    running = store.current
    (tmp_path / "broken.rego").write_text(UNKNOWN_FUNCTION)
    assert await store.reload() is False
    assert store.current is running
    assert store.last_error is not None and "broken.rego:4" in store.last_error
    assert "undefined function net.cidr_contain" in store.last_error
    assert (
        registry.get_sample_value(
            "legation_extauthz_policy_reload_failures_total", {"check": "authz"}
        )
        == 1
    )
    # the running policy keeps deciding
    assert (await servicer.Check(request("/a", policy="p"), None)).status.code == 0
    denied = await servicer.Check(request("/a", "POST", policy="p"), None)
    assert denied.denied_response.status.code == 403
    (tmp_path / "broken.rego").unlink()
    (tmp_path / "p.rego").write_text("package p\nimport rego.v1\nallow := true\n")
    assert await store.reload() is True
    assert (await servicer.Check(request("/a", "POST", policy="p"), None)).status.code == 0
    await close_checks(servicer)


def test_test_files_stay_out_of_the_serving_bundle(tmp_path: Path) -> None:
    """A broken `opa test`-style suite does not keep good policies from serving."""
    (tmp_path / "good.rego").write_text("package good\nimport rego.v1\nallow := true\n")
    (tmp_path / "good_test.rego").write_text(UNKNOWN_FUNCTION)
    compiled = load(tmp_path, rules=("allow",), probe_timeout_s=30)
    assert compiled.files == (str(tmp_path / "good.rego"),)
    with pytest.raises(ConfigError) as err:
        load(tmp_path, rules=("allow",), probe_timeout_s=30, tests=True)
    assert err.value.code == "policy_compile_failed"
