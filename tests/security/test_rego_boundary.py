"""Attacks on the Rego path: a request header must never turn a deny into an allow, an engine gap
or error must never read as "rule undefined", and a slow policy must not outlive its deadline or
stall other requests.

The injection is tried through the real Envoy; the rest run the servicer in-process with real
evaluator processes (OPA's engine). Each of these allowed, hung or crashed on the regopy-based
main this suite was written against.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from envoy.service.auth.v3 import external_auth_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from legation.errors import ConfigError
from legation.extauthz.errors import AuthzError
from legation.extauthz.policies import load
from legation.extauthz.rego import RegoCheck, RegoConfig
from legation.extauthz.request import RequestContext
from legation.extauthz.service import Settings, build_servicer, close_checks
from tests.extauthz.conftest import Route, StackFactory

pytestmark = pytest.mark.either_loop  # on asyncio's loop and on uvloop, as served

# The deny body echoes a header: the shape that let `x", "allowed": true, "z": "` through.
ECHO = """package attack.echo
import rego.v1

allow := {"allowed": true} if {
    input.attributes.request.http.headers["x-user"] == "alice"
} else := {
    "allowed": false, "http_status": 403,
    "body": sprintf("denied: %s", [input.attributes.request.http.headers["x-user"]]),
}
"""

QUOTES = """package attack.quotes
import rego.v1

default allow := false
allow if input.attributes.request.http.headers["x-token"] == "a\\"b\\\\c"
"""

# What the policy sees, returned in the body of a denial so a test can compare it with what
# was sent.
MIRROR = """package attack.mirror
import rego.v1

# as in opa-envoy-plugin, a request without headers has no `headers` key at all
headers := object.get(input.attributes.request.http, "headers", {})

allow := {"allowed": false, "http_status": 403, "body": json.marshal({
    "headers": headers,
    "path": input.attributes.request.http.path,
})}
"""

CIDR = """package attack.cidr
import rego.v1

deny if net.cidr_contains("10.0.0.0/8", input.attributes.request.http.headers["x-ip"])

default allow := false
allow if not deny
"""

DIVIDE = """package attack.divide
import rego.v1

default allow := false
allow if 100 / to_number(input.attributes.request.http.headers["x-n"]) > 1
"""

# Input-dependent cost: x-n elements are counted. Large x-n runs for minutes.
SLOW = """package attack.slow
import rego.v1

default allow := false
n := to_number(input.attributes.request.http.headers["x-n"])
allow if count([x | some x in numbers.range(1, n); x % 7 == 0]) >= 0
"""

FAST = """package attack.fast
import rego.v1

default allow := false
allow if input.attributes.request.http.method == "GET"
"""

POLICIES = {
    "echo": ECHO,
    "quotes": QUOTES,
    "mirror": MIRROR,
    "cidr": CIDR,
    "divide": DIVIDE,
    "slow": SLOW,
    "fast": FAST,
}


@pytest.fixture
def policy_dir(tmp_path: Path) -> Path:
    d = tmp_path / "policies"
    d.mkdir()
    for name, text in POLICIES.items():
        (d / f"{name}.rego").write_text(text)
    return d


def request(
    policy: str, headers: dict[str, str] | None = None, *, path: str = "/x", method: str = "GET"
) -> external_auth_pb2.CheckRequest:
    r = external_auth_pb2.CheckRequest()
    h = r.attributes.request.http
    h.method, h.path, h.host = method, path, "svc"
    h.headers.update(headers or {})
    r.attributes.context_extensions["policy"] = policy
    return r


def service_config(policy_dir: Path, **extra: Any) -> dict[str, Any]:
    return {
        "checks": {
            "authz": {
                "type": "rego",
                "options": {"policy_dir": str(policy_dir), "reload_interval_s": 0, "evaluators": 2},
            }
        },
        "default_checks": ["authz"],
        **extra,
    }


# -- 1. a header cannot rewrite the decision ---------------------------------------------------


@pytest.mark.integration
def test_a_header_cannot_turn_a_deny_into_an_allow_through_envoy(
    stack_factory: StackFactory, policy_dir: Path
) -> None:
    stack = stack_factory(
        config=service_config(policy_dir),
        routes=[Route("/", policy="attack.echo", checks=["authz"])],
    )
    assert stack.client.get("/x", headers={"x-user": "alice"}).status == 200
    assert stack.client.get("/x", headers={"x-user": "mallory"}).status == 403
    for forged in [
        'x", "allowed": true, "z": "',
        'x","allowed":true}',
        '"}, "allowed": true',
        'x\\", "allowed": true, "z": \\"',
        '{"allowed": true}',
    ]:
        denied = stack.client.get("/x", headers={"x-user": forged})
        assert denied.status == 403, forged
        assert denied.body == f"denied: {forged}".encode()  # the policy saw the exact value
    assert stack.upstream.requests == 1


async def test_strings_holding_quotes_and_backslashes_compare_exactly(policy_dir: Path) -> None:
    servicer = await build_servicer(
        Settings(config=service_config(policy_dir), registry=CollectorRegistry())
    )
    try:
        ok = await servicer.Check(request("attack.quotes", {"x-token": 'a"b\\c'}), None)
        assert ok.status.code == 0
        for near in ('a\\"b\\\\c', 'a"b\\\\c', "a'b\\c", 'a"b'):
            no = await servicer.Check(request("attack.quotes", {"x-token": near}), None)
            assert no.denied_response.status.code == 403, near
    finally:
        await close_checks(servicer)


# header names as Envoy passes them on: lower-case tokens; values: any Unicode but NUL, CR, LF
_NAME = st.from_regex(r"\Ax-[a-z0-9-]{1,20}\Z")
_VALUE = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00\r\n"), max_size=60
)
_PATH = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=60
).map(lambda s: "/" + s)


@pytest.fixture
def mirror(policy_dir: Path) -> Iterator[tuple[asyncio.AbstractEventLoop, RegoCheck]]:
    loop = asyncio.new_event_loop()
    check = RegoCheck(RegoConfig(policy_dir=policy_dir, reload_interval_s=0, evaluators=1))
    loop.run_until_complete(check.start())
    yield loop, check
    loop.run_until_complete(check.close())
    loop.close()


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(headers=st.dictionaries(_NAME, _VALUE, max_size=4), path=_PATH)
def test_the_policy_sees_exactly_the_strings_sent(
    mirror: tuple[asyncio.AbstractEventLoop, RegoCheck], headers: dict[str, str], path: str
) -> None:
    loop, check = mirror
    ctx = RequestContext(request("attack.mirror", headers, path=path))
    try:
        decision = loop.run_until_complete(check.check(ctx))
    except AuthzError as e:  # a path opa-envoy-plugin cannot parse either: a named denial
        assert e.code == "malformed_path" and e.is_client_error, e
        return
    assert not decision.allowed
    seen = json.loads(decision.body)
    assert seen == {"headers": headers, "path": path}


async def test_a_result_document_with_duplicate_keys_is_an_error() -> None:
    from legation.extauthz.evaluator import EvaluationError, parse_result

    assert parse_result('{"allowed": false, "body": "x"}') == {"allowed": False, "body": "x"}
    for text in (
        '{"allowed": false, "allowed": true}',
        '{"allowed": false, "headers": {"a": "1", "a": "2"}}',
    ):
        with pytest.raises(EvaluationError, match="duplicate key"):
            parse_result(text)


# -- 2. engine gaps and errors deny --------------------------------------------------------------


def test_a_policy_calling_a_function_the_engine_lacks_is_refused_at_load(tmp_path: Path) -> None:
    (tmp_path / "typo.rego").write_text(
        'package typo\nimport rego.v1\n\ndeny if net.cidr_contain("10.0.0.0/8", input.ip)\n'
    )
    with pytest.raises(ConfigError) as err:
        load(tmp_path, rules=("allow",), probe_timeout_s=30)
    assert str(err.value) == (
        f"{tmp_path / 'typo.rego'}:4: rego_type_error: undefined function net.cidr_contain"
    )


async def test_builtins_regopy_lacked_decide_and_their_errors_deny(policy_dir: Path) -> None:
    registry = CollectorRegistry()
    servicer = await build_servicer(
        Settings(config=service_config(policy_dir, error_status=503), registry=registry)
    )
    try:
        inside = await servicer.Check(request("attack.cidr", {"x-ip": "10.1.2.3"}), None)
        outside = await servicer.Check(request("attack.cidr", {"x-ip": "192.168.0.1"}), None)
        assert inside.denied_response.status.code == 403  # the deny rule fires
        assert outside.status.code == 0
        # a builtin error is not "deny undefined": the request is refused with the error status
        garbage = await servicer.Check(request("attack.cidr", {"x-ip": "garbage"}), None)
        assert garbage.denied_response.status.code == 503
        assert json.loads(garbage.denied_response.body) == {"error": "policy_error"}
        zero = await servicer.Check(request("attack.divide", {"x-n": "0"}), None)
        assert zero.denied_response.status.code == 503
        assert (await servicer.Check(request("attack.divide", {"x-n": "2"}), None)).status.code == 0
        assert (
            registry.get_sample_value(
                "legation_extauthz_check_errors_total",
                {"policy": "attack.cidr", "code": "policy_error"},
            )
            == 1
        )
    finally:
        await close_checks(servicer)


# -- 3. bounded evaluation -----------------------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is dead too
        return f.read().split(")")[-1].split()[0] != "Z"


async def test_the_deadline_holds_and_other_requests_are_answered_meanwhile(
    policy_dir: Path,
) -> None:
    registry = CollectorRegistry()
    servicer = await build_servicer(
        Settings(
            config=service_config(policy_dir, check_timeout_ms=1500, error_status=504),
            registry=registry,
        )
    )
    check: RegoCheck = servicer.checks["authz"]  # type: ignore[assignment]
    pool = await check.store.pool()
    try:
        pids = {w.proc.pid for w in pool._workers}
        small = await servicer.Check(request("attack.slow", {"x-n": "1000"}), None)
        assert small.status.code == 0  # the policy itself is fine on small input
        slow = asyncio.ensure_future(
            servicer.Check(request("attack.slow", {"x-n": "4000000000"}), None)
        )
        await asyncio.sleep(0.05)  # the slow evaluation has been handed to an evaluator
        answered = []
        for i in range(30):  # meanwhile: answered by the other evaluator, in order
            r = await servicer.Check(request("attack.fast", method="GET" if i % 2 else "PUT"), None)
            answered.append(r.status.code == 0)
            assert not slow.done(), "the fast requests waited for the slow one"
        assert answered == [i % 2 == 1 for i in range(30)]
        late = await slow
        assert late.denied_response.status.code == 504
        assert json.loads(late.denied_response.body) == {"error": "timeout"}
        assert pool.killed == 1
        # the process that was evaluating is gone: the CPU it could burn ended at the deadline
        gone = [pid for pid in pids if not _alive(pid)]
        for _ in range(100):
            if gone:
                break
            await asyncio.sleep(0.02)
            gone = [pid for pid in pids if not _alive(pid)]
        assert len(gone) == 1
        # ... and it was replaced: the pool serves with two evaluators again
        for _ in range(250):
            if pool.idle == 2:
                break
            await asyncio.sleep(0.02)
        assert pool.idle == 2 and len(pool._workers) == 2
        assert (await servicer.Check(request("attack.fast"), None)).status.code == 0
    finally:
        await close_checks(servicer)


async def test_an_evaluator_that_dies_mid_request_denies_and_is_replaced(
    policy_dir: Path,
) -> None:
    servicer = await build_servicer(
        Settings(
            config=service_config(policy_dir, check_timeout_ms=5000, error_status=503),
            registry=CollectorRegistry(),
        )
    )
    check: RegoCheck = servicer.checks["authz"]  # type: ignore[assignment]
    pool = await check.store.pool()
    try:
        slow = asyncio.ensure_future(
            servicer.Check(request("attack.slow", {"x-n": "4000000000"}), None)
        )
        await asyncio.sleep(0.1)
        busy = [w for w in pool._workers if w.calls]
        assert len(busy) == 1
        os.kill(busy[0].proc.pid, 9)  # an engine crash, as the OS sees it
        crashed = await slow
        assert crashed.denied_response.status.code == 503
        assert json.loads(crashed.denied_response.body) == {"error": "policy_error"}
        assert pool.crashed == 1
        assert (await servicer.Check(request("attack.fast"), None)).status.code == 0
    finally:
        await close_checks(servicer)


# -- 4. what a policy reads: the input projection and the decision cache must not be fooled -----
# (found by an attacker's review of the evaluator rewrite: each allowed `x-role: admin`)


def _deny_admin_checks(tmp_path: Path, files: dict[str, str]) -> list[RegoCheck]:
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    return [
        RegoCheck(
            RegoConfig(policy_dir=tmp_path, reload_interval_s=0, evaluators=1, project_input=p)
        )
        for p in (True, False)
    ]


_READS_ROLE = 'input.attributes.request.http.headers["x-role"]'

HIDDEN_READS = {
    "template string": {
        "p.rego": (
            "package envoy.authz\nimport rego.v1\ndefault allow := false\nallow if not deny\n"
            f'deny if $"{{{_READS_ROLE}}}" == "admin"\n'
        )
    },
    "raw template string": {
        "p.rego": (
            "package envoy.authz\nimport rego.v1\ndefault allow := false\nallow if not deny\n"
            f'deny if $`{{{_READS_ROLE}}}` == "admin"\n'
        )
    },
    "rule from a sub-package": {
        "a.rego": "package envoy.authz\nimport rego.v1\nx := 1\n",
        "b.rego": (
            "package envoy.authz.allow\nimport rego.v1\ndefault allowed := false\n"
            f'allowed if not deny\ndeny if {_READS_ROLE} == "admin"\n'
        ),
    },
    "rule from a parent package": {
        "a.rego": "package envoy.authz\nimport rego.v1\nx := 1\n",
        "b.rego": (
            "package envoy\nimport rego.v1\ndefault authz.allow := false\n"
            f'authz.allow if not admin\nadmin if {_READS_ROLE} == "admin"\n'
        ),
    },
    "package written with brackets": {
        "a.rego": (
            "package envoy.authz\nimport rego.v1\ndefault allow := false\nallow if not deny\n"
        ),
        "b.rego": f'package envoy["authz"]\nimport rego.v1\ndeny if {_READS_ROLE} == "admin"\n',
    },
}


@pytest.mark.parametrize("files", HIDDEN_READS.values(), ids=HIDDEN_READS.keys())
async def test_a_deny_rule_sees_what_it_reads_however_the_policy_is_written(
    tmp_path: Path, files: dict[str, str]
) -> None:
    checks = _deny_admin_checks(tmp_path, files)
    try:
        for check in checks:
            for role, allowed in (("admin", False), ("guest", True)):
                ctx = RequestContext(request("envoy.authz", {"x-role": role}))
                decision = await check.check(ctx)
                assert decision.allowed is allowed, (check.config.project_input, role)
    finally:
        for check in checks:
            await check.close()


async def test_a_template_string_reading_the_clock_is_never_cached(tmp_path: Path) -> None:
    (tmp_path / "p.rego").write_text(
        'package clock\nimport rego.v1\nallow if $"{time.now_ns()}" != ""\n'
    )
    check = RegoCheck(RegoConfig(policy_dir=tmp_path, reload_interval_s=0, evaluators=1))
    try:
        assert not check.cacheable("clock")
    finally:
        await check.close()


def test_a_package_declaration_that_cannot_be_read_whole_is_refused(tmp_path: Path) -> None:
    (tmp_path / "p.rego").write_text('package envoy["au.thz"]\nimport rego.v1\nallow := true\n')
    with pytest.raises(ConfigError) as err:
        load(tmp_path, rules=("allow",), probe_timeout_s=30)
    assert str(err.value).startswith(
        f"{tmp_path / 'p.rego'}: the first statement must be a package declaration"
    )


async def test_results_that_echo_large_input_are_not_kept(policy_dir: Path) -> None:
    check = RegoCheck(RegoConfig(policy_dir=policy_dir, reload_interval_s=0, evaluators=1))
    try:
        for i in range(20):
            ctx = RequestContext(request("attack.echo", {"x-user": f"{i}" + "x" * 10_000}))
            assert not (await check.check(ctx)).allowed
        assert len(check._decisions) == 0
    finally:
        await check.close()


# -- 5. resources an evaluation may take -------------------------------------------------------


async def test_an_evaluation_past_its_memory_cap_denies_and_its_process_is_replaced(
    policy_dir: Path,
) -> None:
    servicer = await build_servicer(
        Settings(
            config={
                "checks": {
                    "authz": {
                        "type": "rego",
                        "options": {
                            "policy_dir": str(policy_dir),
                            "reload_interval_s": 0,
                            "evaluators": 1,
                            "evaluator_memory_mb": 256,
                        },
                    }
                },
                "default_checks": ["authz"],
                "check_timeout_ms": 60_000,
                "error_status": 503,
            },
            registry=CollectorRegistry(),
        )
    )
    check: RegoCheck = servicer.checks["authz"]  # type: ignore[assignment]
    try:
        huge = await servicer.Check(request("attack.slow", {"x-n": "4000000000"}), None)
        assert huge.denied_response.status.code == 503
        assert json.loads(huge.denied_response.body) == {"error": "policy_error"}
        pool = await check.store.pool()
        assert pool.crashed == 1 and pool.killed == 0  # the cap ended it, not the deadline
        assert (await servicer.Check(request("attack.fast"), None)).status.code == 0
    finally:
        await close_checks(servicer)


def test_network_builtins_are_refused_unless_allowed(tmp_path: Path) -> None:
    for text, line in (
        ('package p\nimport rego.v1\n\nr := http.send({"method": "GET", "url": "x"})\n', 4),
        ('package p\nimport rego.v1\nr := $"{http.send({})}"\n', 3),
        ("package p\nimport rego.v1\nips := net.lookup_ip_addr(input.host)\n", 3),
    ):
        (tmp_path / "p.rego").write_text(text)
        with pytest.raises(ConfigError) as err:
            load(tmp_path, rules=("allow",), probe_timeout_s=30)
        assert str(err.value).startswith(f"{tmp_path / 'p.rego'}:{line}: "), text
        assert "allow_network: true" in str(err.value)
        load(tmp_path, rules=("allow",), probe_timeout_s=30, allow_network=True)


# -- 6. reloads ----------------------------------------------------------------------------------


async def test_a_reload_whose_evaluators_did_not_start_is_retried(
    policy_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from legation.extauthz import evaluator

    check = RegoCheck(RegoConfig(policy_dir=policy_dir, reload_interval_s=0, evaluators=1))
    await check.start()
    try:
        (policy_dir / "fast.rego").write_text(FAST.replace('"GET"', '"PUT"'))
        os.utime(policy_dir / "fast.rego", ns=(1, 1))
        real = evaluator._Worker.spawn

        async def timing_out(*args: Any, **kwargs: Any) -> Any:
            raise TimeoutError

        monkeypatch.setattr(evaluator._Worker, "spawn", timing_out)
        assert await check.store.reload() is False
        assert check.store.failed_reloads == 1
        assert "did not start" in (check.store.last_error or "")
        assert (
            await check.evaluate(
                "attack.fast", {"attributes": {"request": {"http": {"method": "GET"}}}}
            )
        ).allowed  # the running version still decides
        monkeypatch.setattr(evaluator._Worker, "spawn", real)
        assert await check.store.reload() is True  # same files, tried again
        assert (
            await check.evaluate(
                "attack.fast", {"attributes": {"request": {"http": {"method": "PUT"}}}}
            )
        ).allowed
    finally:
        await check.close()


async def test_the_watcher_loads_a_change_only_once_it_holds_still(policy_dir: Path) -> None:
    check = RegoCheck(RegoConfig(policy_dir=policy_dir, reload_interval_s=0, evaluators=1))
    try:
        (policy_dir / "fast.rego").write_text(FAST.replace('"GET"', '"PUT"'))
        os.utime(policy_dir / "fast.rego", ns=(1, 1))
        assert await check.store.reload(settle=True) is False  # seen once: maybe mid-write
        assert await check.store.reload(settle=True) is True
        assert await check.store.reload(settle=True) is False
    finally:
        await check.close()
