"""The rego check through the real Envoy: allow, custom denials, injected headers, per-route
policies, disabled routes, dry-run, bodies, and policy hot reload (valid and invalid)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from tests.extauthz.conftest import Route, StackFactory, read_log

pytestmark = pytest.mark.integration

CUSTOM = """package demo.custom
import rego.v1

default allow := {"allowed": false, "http_status": 429, "body": "no tea for you",
                  "headers": {"x-denied-by": "demo.custom"}}

allow := {"allowed": true, "headers": {"x-injected": "from-policy"},
          "request_headers_to_remove": ["x-secret"],
          "response_headers_to_add": {"x-decided-by": "demo.custom"}} if {
    input.attributes.request.http.headers["x-let-me-in"] == "yes"
}
"""

OTHER = """package demo.other
import rego.v1

default allow := false
allow if input.attributes.request.http.method == "GET"
"""

BODY = """package demo.body
import rego.v1

default allow := false
allow if {
    not input.truncated_body
    input.parsed_body.amount < 100
}
"""

BETA = """package demo.beta
import rego.v1

default allow := false
"""

ROUTES = [
    Route("/public", disabled=True),
    Route("/custom", policy="demo.custom", checks=["authz"]),
    Route("/other", policy="demo.other", checks=["authz"]),
    Route("/body", policy="demo.body", checks=["authz"]),
    Route("/beta", policy="demo.beta", checks=["authz"]),
]


def write_policies(directory: Path) -> Path:
    directory.mkdir()
    for name, text in {"custom": CUSTOM, "other": OTHER, "body": BODY, "beta": BETA}.items():
        (directory / f"{name}.rego").write_text(text)
    return directory


def config(policy_dir: Path, log: Path, **extra: Any) -> dict[str, Any]:
    return {
        "checks": {
            "authz": {
                "type": "rego",
                "options": {"policy_dir": str(policy_dir), "reload_interval_s": 0.05},
            }
        },
        "dry_run": ["demo.beta"],
        "decision_log": str(log),
        **extra,
    }


@pytest.fixture
def stack(stack_factory: StackFactory, tmp_path: Path) -> Any:
    policies = write_policies(tmp_path / "policies")
    s = stack_factory(config=config(policies, tmp_path / "decisions.jsonl"), routes=ROUTES)
    s.policy_dir = policies  # type: ignore[attr-defined]
    s.log = tmp_path / "decisions.jsonl"  # type: ignore[attr-defined]
    return s


def decisions(path: Path, until_path: str) -> list[dict[str, Any]]:
    """The log entries, once one for ``until_path`` is there (the log is flushed ~0.2 s later)."""
    return read_log(path, lambda entries: any(e["path"] == until_path for e in entries))


def test_allowed_with_injected_header_reaching_upstream(stack: Any) -> None:
    r = stack.client.get("/custom/x", headers={"x-let-me-in": "yes", "x-secret": "s3"})
    assert r.status == 200
    echoed = r.json()["headers"]
    assert echoed["x-injected"] == "from-policy"
    assert "x-secret" not in echoed  # request_headers_to_remove
    assert r.headers["x-decided-by"] == "demo.custom"  # response_headers_to_add


def test_denied_with_custom_status_body_and_headers(stack: Any) -> None:
    r = stack.client.get("/custom/x")
    assert r.status == 429
    assert r.body == b"no tea for you"
    assert r.headers["x-denied-by"] == "demo.custom"
    assert stack.upstream.requests == 0


def test_client_cannot_forge_the_injected_header(stack: Any) -> None:
    r = stack.client.get("/custom/x", headers={"x-let-me-in": "yes", "x-injected": "forged"})
    assert r.json()["headers"]["x-injected"] == "from-policy"


def test_per_route_policy(stack: Any) -> None:
    assert stack.client.get("/other/a").status == 200
    assert stack.client.request("DELETE", "/other/a").status == 403
    assert stack.client.request("DELETE", "/custom/a").status == 429


def test_disabled_route_needs_no_check(stack: Any) -> None:
    assert stack.client.request("DELETE", "/public/a").status == 200
    assert stack.client.get("/other/after").status == 200
    entries = decisions(stack.log, "/other/after")
    assert [d["path"] for d in entries] == ["/other/after"]  # /public/a never reached us


def test_json_and_oversized_and_malformed_bodies(stack: Any) -> None:
    ok = stack.client.request(
        "POST", "/body/pay", body=b'{"amount": 5}', headers={"content-type": "application/json"}
    )
    assert ok.status == 200
    too_much = stack.client.request(
        "POST", "/body/pay", body=b'{"amount": 500}', headers={"content-type": "application/json"}
    )
    assert too_much.status == 403
    # larger than max_request_bytes: Envoy sends a partial body, the policy sees truncated_body
    big = json.dumps({"amount": 1, "pad": "x" * 4000}).encode()
    r = stack.client.request(
        "POST", "/body/pay", body=big, headers={"content-type": "application/json"}
    )
    assert r.status == 403
    bad = stack.client.request(
        "POST", "/body/pay", body=b'{"amount": ', headers={"content-type": "application/json"}
    )
    assert bad.status == 400
    assert json.loads(bad.body) == {"error": "malformed_body"}
    form = stack.client.request(
        "POST",
        "/body/pay",
        body=b"amount=5",
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert form.status == 403  # form values are lists of strings: the rule does not match


def test_dry_run_passes_and_logs_would_deny(stack: Any) -> None:
    r = stack.client.get("/beta/x")
    assert r.status == 200
    entry = [d for d in decisions(stack.log, "/beta/x") if d["path"] == "/beta/x"][-1]
    assert entry["result"] == "would_deny"
    assert entry["policy"] == "demo.beta"
    assert entry["dry_run"] is True
    assert len(entry["decision_id"]) == 32
    assert entry["latency_ms"] >= 0
    metric = stack.registry.get_sample_value(
        "legation_extauthz_decisions_total", {"policy": "demo.beta", "result": "would_deny"}
    )
    assert metric == 1.0


def wait_for(predicate: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_hot_reload_valid_then_invalid(stack: Any) -> None:
    assert stack.client.request("DELETE", "/other/a").status == 403
    (stack.policy_dir / "other.rego").write_text(OTHER.replace('"GET"', '"DELETE"'))
    assert wait_for(lambda: stack.client.request("DELETE", "/other/a").status == 200)
    # a policy that does not compile never replaces the running one
    (stack.policy_dir / "other.rego").write_text("package demo.other\nallow if { input.x == }\n")
    check = stack.service.call(_rego_check(stack.service))
    assert wait_for(lambda: check.store.failed_reloads >= 1)
    assert "other.rego" in check.store.last_error
    assert stack.client.request("DELETE", "/other/a").status == 200
    assert stack.client.get("/other/a").status == 403


async def _rego_check(service: Any) -> Any:
    from legation.extauthz.service import _running

    return _running[service.server].checks["authz"]


def test_service_down_denies_everything(stack_factory: StackFactory) -> None:
    """Nothing listens on the authz port: Envoy fails closed and no request leaks through."""
    from tests.conftest import free_port

    s = stack_factory(config=None, authz_port=free_port(), routes=ROUTES)
    statuses = [
        s.client.request(m, f"/other/{i}").status for i in range(20) for m in ("GET", "POST")
    ]
    assert statuses == [403] * 40
    assert s.upstream.requests == 0
    assert s.client.get("/public/ok").status == 200  # routes without a check still work
    assert s.envoy.stats("ext_authz").get("http.ingress.ext_authz.error", 0) >= 40
