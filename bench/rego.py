"""Embedded Rego per decision, in process, side by side in one run.

For each policy shape, the cost of one decision:
  regopy API    regopy's own high-level API with a fresh ``Input`` of the whole opa-envoy-plugin
                document each call (``Interpreter.set_input`` + ``query_bundle_entrypoint``,
                the result read from ``Output``): what a straightforward embedding pays
  engine only   our direct C calls with the projected input already built: set input + query
  RegoCheck     Legation's path as the servicer runs it, CheckRequest -> RequestContext ->
                ``RegoCheck.check`` -> Decision, with the decision cache off
  cached        the same with the decision cache on and the same request repeated (what a
                benchmark or a hot route sees); ``-`` where the policy is not cacheable
Shapes: a one-rule policy, the OPA-Envoy tutorial (token verified in Rego, ``time.now_ns``), the
function style (``allow := decision({...input parts...})``) the shipped example used before, and
plain rules returning an object (allowed/headers/body), which is what ``policies/envoy`` uses now.
The JWT check is assumed done: ``input.jwt.claims`` is set as the ``jwt`` check would set it.

    .venv/bin/python -m bench.rego [--seconds 0.4] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from envoy.service.auth.v3 import external_auth_pb2
from regopy import Input, Interpreter

from legation.extauthz import _regofast
from legation.extauthz.checks import Decision
from legation.extauthz.rego import RegoCheck, RegoConfig
from legation.extauthz.request import RequestContext, build_input
from legation.extauthz.response import decision_from_result
from tests.extauthz.test_opa_envoy_compat import TUTORIAL_STYLE, hs256

REPO = Path(__file__).resolve().parents[1]

ONE_RULE = """package bench.one

import rego.v1

allow if input.attributes.request.http.method == "GET"
"""

FUNCTION_STYLE = """package bench.function

import rego.v1

allow := decision({
	"attributes": {"request": {"http": {"method": input.attributes.request.http.method}}},
	"parsed_path": input.parsed_path,
	"jwt": {"claims": claims},
	"parsed_body": body,
	"truncated_body": truncated,
})

default claims := {}

claims := input.jwt.claims

default body := null

body := input.parsed_body

default truncated := true

truncated := input.truncated_body

decision(req) := {
	"allowed": true,
	"headers": {"x-legation-role": req.jwt.claims.role},
	"response_headers_to_add": {"x-legation-policy": "envoy.authz"},
} if {
	action_allowed(req)
} else := {
	"allowed": false,
	"http_status": 403,
	"body": "{\\"error\\":\\"forbidden\\",\\"policy\\":\\"envoy.authz\\"}",
	"headers": {"content-type": "application/json", "x-legation-policy": "envoy.authz"},
}

action_allowed(req) if {
	req.jwt.claims.role == "guest"
	req.attributes.request.http.method == "GET"
	req.parsed_path == ["people"]
}

action_allowed(req) if {
	req.jwt.claims.role == "admin"
	req.attributes.request.http.method == "GET"
	req.parsed_path[0] == "people"
}

action_allowed(req) if {
	req.jwt.claims.role == "admin"
	req.attributes.request.http.method == "POST"
	req.parsed_path == ["people"]
	not req.truncated_body
	lower(req.parsed_body.firstname) == req.jwt.claims.sub
}
"""

OBJECT_RULES = """package bench.object

import rego.v1

default allow := {
	"allowed": false,
	"http_status": 403,
	"body": "{\\"error\\":\\"forbidden\\"}",
	"headers": {"content-type": "application/json"},
}

allow := {
	"allowed": true,
	"headers": {"x-legation-role": input.jwt.claims.role},
	"response_headers_to_add": {"x-legation-policy": "bench.object"},
} if {
	input.jwt.claims.role == "guest"
	input.attributes.request.http.method == "GET"
	input.parsed_path == ["people"]
}
"""

SHAPES = [  # (label, package, source or None for the shipped policies/ directory)
    ("one rule", "bench.one", ONE_RULE),
    ("OPA-Envoy tutorial", "bench.tutorial",
     TUTORIAL_STYLE.replace("package envoy.authz", "package bench.tutorial")),
    ("function style", "bench.function", FUNCTION_STYLE),
    ("object, plain rules", "bench.object", OBJECT_RULES),
    ("shipped envoy.authz", "envoy.authz", None),
]


def check_request(package: str) -> external_auth_pb2.CheckRequest:
    """GET /people as Envoy sends it (headers, peers), routed to ``package``."""
    now = int(time.time())
    r = external_auth_pb2.CheckRequest()
    attrs = r.attributes
    h = attrs.request.http
    h.id, h.method, h.path, h.host, h.scheme, h.protocol = (
        "1234567890", "GET", "/people", "svc", "http", "HTTP/1.1")
    token = hs256({"role": "guest", "sub": "YWxpY2U", "nbf": now - 60, "exp": now + 3600})
    for k, v in {":authority": "svc", ":method": "GET", ":path": "/people", ":scheme": "http",
                 "authorization": f"Bearer {token}", "user-agent": "wrk/4.2",
                 "accept": "*/*", "x-forwarded-proto": "http",
                 "x-request-id": "8a6e4bb6-54a1-4c4e-9a53-1c1f8b5e3c2d"}.items():
        h.headers[k] = v
    attrs.request.time.FromSeconds(now)
    attrs.source.address.socket_address.address = "127.0.0.1"
    attrs.source.address.socket_address.port_value = 51234
    attrs.destination.address.socket_address.address = "127.0.0.1"
    attrs.destination.address.socket_address.port_value = 10000
    attrs.context_extensions["policy"] = package
    return r


CLAIMS = {"iss": "https://bench.test", "aud": "legation", "sub": "alice", "role": "guest",
          "iat": 1700000000, "exp": 1900000000}


def context(request: external_auth_pb2.CheckRequest) -> RequestContext:
    ctx = RequestContext(request)
    ctx.claims, ctx.jwt_provider = dict(CLAIMS), "bench"
    return ctx


def run_check(check: RegoCheck, request: external_auth_pb2.CheckRequest) -> Decision:
    """RequestContext + check, stepped by hand as the servicer's ``_bounded`` does."""
    coro = check.check(context(request))
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    raise RuntimeError("the rego check suspended")


def per_call_us(fn: Callable[[], Any], seconds: float, rounds: int) -> float:
    """Median over rounds of the mean time per call (us), each round ~``seconds`` long."""
    fn()
    n = 1
    while True:  # calibrate: n calls take ~seconds / 4
        t = time.perf_counter()
        for _ in range(n):
            fn()
        if time.perf_counter() - t > seconds / 4:
            break
        n *= 2
    n = max(1, int(n * seconds / max(time.perf_counter() - t, 1e-9) / 1))
    samples = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        samples.append((time.perf_counter() - t) / n * 1e6)
    return statistics.median(samples)


def high_level(check: RegoCheck, package: str, document: dict[str, Any]) -> Callable[[], Any]:
    bundle = check.store.current.bundle
    ep = package.replace(".", "/") + "/allow"
    interp = Interpreter()

    def call() -> Decision:
        interp.set_input(Input(document))
        out = interp.query_bundle_entrypoint(bundle, ep)
        if not out.ok():
            raise RuntimeError(str(out))
        exprs = out.results[0].expressions if out.results else []
        result = exprs[0] if exprs else None
        return decision_from_result(result, where=package)
    return call


def engine_only(check: RegoCheck, package: str, request: external_auth_pb2.CheckRequest,
                ) -> Callable[[], Any]:
    compiled = check._current()
    ep, only = check._entrypoint(compiled, package)[:2]
    document = context(request).input(only)
    interp = Interpreter()

    def call() -> tuple[bool, str]:
        _regofast.set_input(interp, document)
        return _regofast.query(interp, compiled.bundle, ep)
    return call


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=0.4, help="per round and row")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-rego-") as d:
        tmp = Path(d)
        for _, package, source in SHAPES:
            if source is not None:
                (tmp / f"{package.replace('.', '_')}.rego").write_text(source)

        def rego(directory: Path, cache: int) -> RegoCheck:
            return RegoCheck(RegoConfig(policy_dir=directory, reload_interval_s=0,
                                        **({"decision_cache_size": cache}
                                           if "decision_cache_size" in RegoConfig.model_fields
                                           else {})))
        checks = {(src, cache): rego(tmp if src else REPO / "policies", cache)
                  for src in (True, False) for cache in (0, 4096)}
        rows = []
        print(f"us per decision (median of {args.rounds} rounds of ~{args.seconds} s), "
              "GET /people, role guest", flush=True)
        print(f"  {'shape':22s} {'regopy API':>10s} {'engine':>8s} {'RegoCheck':>10s} "
              f"{'cached':>8s}   {'API/Check':>9s} {'Check/engine':>12s} {'Check/cached':>12s}")
        for label, package, source in SHAPES:
            check, cached = checks[(source is not None, 0)], checks[(source is not None, 4096)]
            request = check_request(package)
            whole = context(request).input()
            expected = run_check(check, request)
            assert high_level(check, package, whole)() == expected, label
            assert run_check(cached, request) == expected, label
            api = per_call_us(high_level(check, package, whole), args.seconds, args.rounds)
            eng = per_call_us(engine_only(check, package, request), args.seconds, args.rounds)
            ours = per_call_us(lambda c=check, r=request: run_check(c, r), args.seconds,
                               args.rounds)
            hit = None
            if getattr(cached, "cacheable", lambda p: False)(package):
                hit = per_call_us(lambda c=cached, r=request: run_check(c, r), args.seconds,
                                  args.rounds)
            rows.append((label, api, eng, ours, hit))
            print(f"  {label:22s} {api:10.1f} {eng:8.1f} {ours:10.1f} "
                  f"{(f'{hit:8.1f}' if hit else '       -')}   {api / ours:9.2f} "
                  f"{ours / eng:12.2f} {(f'{ours / hit:12.1f}' if hit else '           -')}",
                  flush=True)
        print("\nbuilding the input alone (whole document, for comparison): "
              f"{per_call_us(lambda: build_input(check_request('x')), args.seconds, 1):.1f} us")
        for c in checks.values():
            asyncio.run(c.close())
    del rows


if __name__ == "__main__":
    sys.exit(main())
