"""The decision table both call-outs must agree on, and how to read each one's answer.

A case is a client request (method, path, headers, body) on a route (policy, checks). It is
turned into what Envoy would send in each mode: a ``CheckRequest`` for gRPC, an HTTP call for the
fast path; each answer is read back into an :class:`Outcome` (what Envoy applies), and the two
outcomes must be equal.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import httptools
from envoy.service.auth.v3 import external_auth_pb2

from legation.extauthz.checks import ALLOW, Decision, PythonCheck
from legation.extauthz.errors import AuthzError
from legation.extauthz.request import RequestContext
from legation.fastpath.contract import CHECKS_HEADER, PATH_PREFIX, POLICY_HEADER, REMOVE_HEADER

UPSTREAM_HEADERS = ("x-user",)  # the filter's Callout.upstream_headers in these tests
CLIENT_HEADERS = ("x-cache",)  # its Callout.client_headers
ALLOWED_HEADERS = ("x-tenant", "content-type", "x-drop")  # its Callout.allowed_headers

POLICY = """package fast.test
import rego.v1

first := input.parsed_path[0]
http := input.attributes.request.http

default result := false

result := {"allowed": true, "headers": {"x-user": http.headers["x-tenant"]}} if first == "allow"
result := {"allowed": false, "http_status": 409, "body": "no tea",
           "headers": {"set-cookie": ["a=1", "b=2"], "content-type": "text/plain"}} if {
    first == "teapot"
}
result := {"allowed": true, "request_headers_to_remove": ["x-drop"],
           "headers": {"x-legation-user": "bob"}} if first == "remove"
result := {"allowed": true, "headers": {"x-user": ["a", "b"]}} if first == "multi"
result := {"allowed": true, "response_headers_to_add": {"x-cache": "hit"}} if first == "cache"
result := http.headers.authorization == "Bearer ok" if first == "auth"
result := input.parsed_query.x == ["1"] if first == "query"
result := input.parsed_body.a == 1 if first == "body"
result := {"allowed": false, "headers": {"x-bad": "a\\r\\nb"}} if first == "inject"
result := {"allowed": false, "http_status": 429} if first == "limited"
result := http.method == "GET" if first == "method"
result := input.attributes.contextExtensions.policy == "fast.test" if first == "extensions"
result := {"allowed": true, "headers": {"x-other": "1"}} if first == "unlisted"
result := {"allowed": true, "query_parameters_to_set": {"a": "1"}} if first == "qset"
"""


class TableCheck(PythonCheck):
    """Python checks by path: ``boom`` raises, ``token`` is a client error, ``slow`` outlives
    the timeout, ``wait`` waits a little then allows with a header, ``crlf`` builds a header
    with CR/LF itself."""

    name = "table"

    async def check(self, ctx: RequestContext) -> Decision:
        first = ctx.path.lstrip("/").split("/")[0].split("?")[0]
        if first == "boom":
            raise RuntimeError("boom")
        if first == "token":
            raise AuthzError("no token", code="missing_token", status=401)
        if first == "slow":
            await asyncio.sleep(5)
        if first == "wait":
            await asyncio.sleep(0.01)
            return Decision(allowed=True, headers={"x-user": "waited"})
        if first == "crlf":
            return Decision(allowed=True, headers={"x-user": "a\r\nx-evil: 1"})
        return ALLOW


class TableFactory:
    name = "table"

    def validate(self, raw: Mapping[str, Any]) -> dict[str, Any]:
        return dict(raw)

    def create(self, config: Any) -> TableCheck:
        return TableCheck()


def service_config(policy_dir: str) -> dict[str, Any]:
    return {
        "checks": {
            "rego": {
                "type": "rego",
                "options": {"policy_dir": policy_dir, "reload_interval_s": 0, "decision": "result"},
            },
            "table": {"type": "table"},
        },
        "default_checks": ["rego"],
        "default_policy": "fast.test",
        "dry_run": ["fast.dry"],
        "deny_status": 403,
        "error_status": 503,
        "check_timeout_ms": 1500,  # generous: a loaded machine must not time out a Rego case
    }


@dataclass(frozen=True)
class Case:
    name: str
    path: str
    method: str = "GET"
    headers: Mapping[str, str] = field(default_factory=dict)
    body: str = ""
    policy: str | None = "fast.test"
    checks: tuple[str, ...] = ("rego",)
    allowed: bool = True  # what both must say (so the table is not vacuous)
    status: int = 200


CASES = [
    Case("allow injects an upstream header", "/allow", headers={"x-tenant": "t1"}),
    Case("deny: status, body, two set-cookie", "/teapot", allowed=False, status=409),
    Case("allow removes a header, adds x-legation-*", "/remove", headers={"x-drop": "1"}),
    Case("several values of one upstream header", "/multi"),
    Case("response header for the client", "/cache"),
    Case("authorization header read", "/auth", headers={"authorization": "Bearer ok"}),
    Case(
        "authorization wrong",
        "/auth",
        headers={"authorization": "Bearer no"},
        allowed=False,
        status=403,
    ),
    Case("query read", "/query?x=1&y=2"),
    Case("query wrong", "/query?x=2", allowed=False, status=403),
    Case(
        "JSON body read",
        "/body",
        method="POST",
        body='{"a": 1}',
        headers={"content-type": "application/json"},
    ),
    Case(
        "malformed JSON body: client error",
        "/body",
        method="POST",
        body='{"a": ',
        headers={"content-type": "application/json"},
        allowed=False,
        status=400,
    ),
    Case("malformed path: client error", "/a%zz", allowed=False, status=400),
    Case("policy header with CR/LF: error status", "/inject", allowed=False, status=503),
    Case("denial with its own status", "/limited", allowed=False, status=429),
    Case("method read", "/method", method="DELETE", allowed=False, status=403),
    Case("policy name in context extensions", "/extensions"),
    Case("undefined path: deny", "/nothing", allowed=False, status=403),
    Case(
        "dry-run policy lets a denial pass, unchanged",
        "/teapot",
        policy="fast.dry",
        checks=("table", "rego"),
    ),
    Case(
        "route names an unknown check: error",
        "/allow",
        checks=("ghost",),
        allowed=False,
        status=503,
    ),
    Case(
        "default checks when the route names none", "/allow", checks=(), headers={"x-tenant": "t2"}
    ),
    Case("python check raises: fail closed", "/boom", checks=("table",), allowed=False, status=503),
    Case("python client error with status", "/token", checks=("table",), allowed=False, status=401),
    Case(
        "python check times out: fail closed", "/slow", checks=("table",), allowed=False, status=503
    ),
    Case("python check that waits", "/wait", checks=("table",)),
    Case("python check builds CR/LF: error", "/crlf", checks=("table",), allowed=False, status=503),
    Case("chain: table then rego", "/allow", checks=("table", "rego"), headers={"x-tenant": "t3"}),
]

# Decisions HTTP mode cannot carry: gRPC applies them, the fast path fails closed (503).
GRPC_ONLY = [
    Case("upstream header the filter would drop", "/unlisted"),
    Case("query parameter mutation", "/qset"),
]


@dataclass(frozen=True)
class Outcome:
    allowed: bool
    status: int
    body: str = ""
    upstream: tuple[tuple[str, str], ...] = ()  # name -> value as the upstream gets it
    removed: tuple[str, ...] = ()
    to_client: tuple[tuple[str, str], ...] = ()  # response (allowed) or denial headers


def grpc_request(case: Case, host: str = "svc.local") -> external_auth_pb2.CheckRequest:
    """The CheckRequest Envoy sends for ``case`` (headers cut to what HTTP mode would send)."""
    r = external_auth_pb2.CheckRequest()
    http = r.attributes.request.http
    http.method, http.path, http.host = case.method, case.path, host
    for k, v in {
        ":authority": host,
        ":method": case.method,
        ":path": case.path,
        **case.headers,
    }.items():
        http.headers[k] = v
    if case.body:
        http.body = case.body
    if case.policy:
        r.attributes.context_extensions["policy"] = case.policy
    if case.checks:
        r.attributes.context_extensions["checks"] = ",".join(case.checks)
    return r


def http_call(case: Case, host: str = "svc.local") -> bytes:
    """The HTTP request Envoy sends for ``case`` in HTTP mode."""
    lines = [
        f"{case.method} {PATH_PREFIX}{case.path} HTTP/1.1",
        f"host: {host}",
        f"content-length: {len(case.body.encode())}",
    ]
    lines += [f"{k}: {v}" for k, v in case.headers.items()]
    if case.policy:
        lines.append(f"{POLICY_HEADER}: {case.policy}")
    if case.checks:
        lines.append(f"{CHECKS_HEADER}: {','.join(case.checks)}")
    lines += ["x-envoy-internal: true", "x-envoy-expected-rq-timeout-ms: 1000"]
    return ("\r\n".join(lines) + "\r\n\r\n" + case.body).encode()


def from_grpc(response: external_auth_pb2.CheckResponse) -> Outcome:
    if response.status.code == 0:
        ok = response.ok_response
        upstream: dict[str, str] = {}
        for option in ok.headers:  # first value overwrites, further ones append with ","
            key, value = option.header.key.lower(), option.header.value
            upstream[key] = f"{upstream[key]},{value}" if key in upstream else value
        return Outcome(
            True,
            200,
            upstream=tuple(sorted(upstream.items())),
            removed=tuple(ok.headers_to_remove),
            to_client=tuple(
                sorted((o.header.key.lower(), o.header.value) for o in ok.response_headers_to_add)
            ),
        )
    denied = response.denied_response
    return Outcome(
        False,
        denied.status.code,
        denied.body,
        to_client=tuple(sorted((o.header.key.lower(), o.header.value) for o in denied.headers)),
    )


class _Response:
    def __init__(self) -> None:
        self.headers: list[tuple[str, str]] = []
        self.body = b""
        self.done = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.decode().lower(), value.decode()))

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.done = True


def parse_answer(raw: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
    out = _Response()
    parser = httptools.HttpResponseParser(out)
    parser.feed_data(raw)
    assert out.done, raw
    return parser.get_status_code(), out.headers, out.body


def from_http(raw: bytes) -> Outcome:
    """What Envoy does with the answer, given the filter built from the same lists."""
    status, headers, body = parse_answer(raw)
    headers = [(k, v) for k, v in headers if k not in ("content-length", "connection")]
    if status == 200:
        upstream = tuple(
            sorted(
                (k, v) for k, v in headers if k.startswith("x-legation-") or k in UPSTREAM_HEADERS
            )
        )
        removed = tuple(v for k, v in headers if k == REMOVE_HEADER)
        return Outcome(
            True,
            200,
            upstream=upstream,
            removed=tuple(removed[0].split(",")) if removed else (),
            to_client=tuple(sorted((k, v) for k, v in headers if k in CLIENT_HEADERS)),
        )
    return Outcome(False, status, body.decode(), to_client=tuple(sorted(headers)))
