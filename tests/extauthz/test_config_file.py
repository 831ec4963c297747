"""The ext_authz config file: its relative paths follow the file, not the working directory, and
opa-envoy-plugin's input options (skip_request_body_parse, proto_descriptor) reach the input."""

from __future__ import annotations

from pathlib import Path

import pytest
from envoy.service.auth.v3 import external_auth_pb2
from prometheus_client import CollectorRegistry

from legation.errors import ConfigError
from legation.extauthz.config import load_file
from legation.extauthz.request import RequestContext
from legation.extauthz.service import Settings, build_servicer, close_checks

REPO = Path(__file__).resolve().parents[2]


def test_the_quickstart_config_loads_from_any_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    loaded = load_file(REPO / "examples" / "quickstart" / "authz.yaml")
    policy_dir = loaded.check_configs["rego"][1].policy_dir
    assert policy_dir == (REPO / "policies" / "quickstart").resolve()
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "authz.yaml").write_text(
        "checks: {rego: {type: rego, options: {policy_dir: ../pol}}}\n"
        "decision_log: logs/decisions.jsonl\n"
    )
    (tmp_path / "pol").mkdir()
    (tmp_path / "pol" / "p.rego").write_text("package p\nimport rego.v1\nallow := true\n")
    monkeypatch.chdir(REPO)
    loaded = load_file(tmp_path / "conf" / "authz.yaml")
    assert loaded.check_configs["rego"][1].policy_dir == (tmp_path / "pol").resolve()
    assert loaded.service.decision_log == str(
        (tmp_path / "conf" / "logs" / "decisions.jsonl").resolve()
    )


def test_a_proto_descriptor_that_cannot_be_used_names_the_file_and_field(tmp_path: Path) -> None:
    config = tmp_path / "authz.yaml"
    config.write_text("proto_descriptor: missing.pb\n")
    with pytest.raises(ConfigError) as err:
        load_file(config)
    assert str(err.value) == (
        f"{config}: proto_descriptor: {tmp_path / 'missing.pb'}: "
        "cannot read: No such file or directory"
    )
    (tmp_path / "bad.pb").write_bytes(b"\x0a\x03not a descriptor set")
    config.write_text("proto_descriptor: bad.pb\n")
    with pytest.raises(ConfigError, match=r"proto_descriptor: .*bad\.pb: not a usable"):
        load_file(config)


async def test_skip_request_body_parse_leaves_the_body_unparsed() -> None:
    def request() -> external_auth_pb2.CheckRequest:
        r = external_auth_pb2.CheckRequest()
        h = r.attributes.request.http
        h.method, h.path, h.body = "POST", "/x", '{"a": 1}'
        h.headers["content-type"] = "application/json"
        return r

    parsed = await build_servicer(Settings(config={}, registry=CollectorRegistry()))
    skipped = await build_servicer(
        Settings(config={"skip_request_body_parse": True}, registry=CollectorRegistry())
    )
    try:
        assert RequestContext(request(), parsed.input_options).input()["parsed_body"] == {"a": 1}
        doc = RequestContext(request(), skipped.input_options).input()
        assert "parsed_body" not in doc and "truncated_body" not in doc
    finally:
        await close_checks(parsed)
        await close_checks(skipped)
