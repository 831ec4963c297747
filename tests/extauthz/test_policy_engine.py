"""Policies on OPA's engine: data documents placed as in an OPA bundle, `opa test`-style suites
(``with`` on input, data, rules and builtins), and what loading refuses."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from legation.errors import ConfigError
from legation.extauthz import policy_test
from legation.extauthz.policies import load
from legation.extauthz.rego import RegoCheck, RegoConfig

POLICY = """package team.authz
import rego.v1

default allow := false
allow if input.user in data.team.roles.admins
allow if data.settings.open
"""


async def test_data_documents_sit_at_their_directory_path(tmp_path: Path) -> None:
    (tmp_path / "authz.rego").write_text(POLICY)
    (tmp_path / "team" / "roles").mkdir(parents=True)
    (tmp_path / "team" / "roles" / "data.yaml").write_text("admins: [alice, bob]\n")
    (tmp_path / "data.json").write_text('{"settings": {"open": false}}')
    check = RegoCheck(RegoConfig(policy_dir=tmp_path, reload_interval_s=0, evaluators=1))
    try:
        assert (await check.evaluate("team.authz", {"user": "alice"})).allowed
        assert not (await check.evaluate("team.authz", {"user": "carol"})).allowed
    finally:
        await check.close()
    (tmp_path / "data.json").write_text('{"settings": {"open": true}}')
    check = RegoCheck(RegoConfig(policy_dir=tmp_path, reload_interval_s=0, evaluators=1))
    try:
        assert (await check.evaluate("team.authz", {"user": "carol"})).allowed
    finally:
        await check.close()


def test_bad_data_documents_are_refused_naming_the_file(tmp_path: Path) -> None:
    (tmp_path / "authz.rego").write_text(POLICY)
    (tmp_path / "data.json").write_text('{"settings": ')
    with pytest.raises(ConfigError, match=r"data\.json: not valid JSON"):
        load(tmp_path, rules=("allow",), probe_timeout_s=30)
    (tmp_path / "data.json").unlink()
    bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [{', '.join(['*' + p] * 10)}]\n"
        for p, c in zip("abcdefgh", "bcdefghi", strict=True)
    )
    (tmp_path / "data.yaml").write_text(bomb)
    with pytest.raises(ConfigError, match=r"data\.yaml"):
        load(tmp_path, rules=("allow",), probe_timeout_s=30)


SUITE = """package team.authz_test
import rego.v1

import data.team.authz

test_admin if authz.allow with input as {"user": "alice"}
test_data_replaced if authz.allow with input as {"user": "zed"}
    with data.team.roles.admins as ["zed"]
test_rule_replaced if authz.allow with data.team.authz.allow as true
test_builtin_replaced if time.now_ns() == 7 with time.now_ns as 7
test_function_mocked if authz.allow with input as {"user": "x"} with data.settings.open as true
test_fails if authz.allow with input as {"user": "nobody"}
"""


def test_policy_test_supports_with_on_input_data_rules_and_builtins(tmp_path: Path) -> None:
    (tmp_path / "authz.rego").write_text(POLICY)
    (tmp_path / "authz_test.rego").write_text(SUITE)
    (tmp_path / "team" / "roles").mkdir(parents=True)
    (tmp_path / "team" / "roles" / "data.json").write_text('{"admins": ["alice"]}')
    (tmp_path / "data.json").write_text('{"settings": {"open": false}}')
    out = io.StringIO()
    assert policy_test.run(tmp_path, verbose=True, out=out) == 2
    text = out.getvalue()
    for name in (
        "test_admin",
        "test_data_replaced",
        "test_rule_replaced",
        "test_builtin_replaced",
        "test_function_mocked",
    ):
        assert f"data.team.authz_test.{name}: PASS" in text, name
    assert "data.team.authz_test.test_fails: FAIL" in text
    assert "PASS: 5/6" in text and "FAIL: 1/6" in text
