"""Rego per decision, side by side in one run: the alternative, the engine alone, Legation.

For each policy shape, the cost of one decision (GET /people, role guest):
  regopy        the embedded engine Legation used before (rego-cpp), its high-level API with a
                fresh ``Input`` of the whole opa-envoy-plugin document each call, in this process
                (the alternative; ``-`` when regopy is not installed: ``pip install regopy``)
  OPA engine    OPA's Go engine (opa-golib-python-bindings) in this process with the projected
                input: ``eval_document`` alone, no isolation (the limit)
  RegoCheck     Legation's path, CheckRequest -> RequestContext -> ``RegoCheck.check`` ->
                Decision with the decision cache off: the input is sent as JSON to an evaluator
                process and the answer awaited on the event loop; wall time per decision, and the
                CPU of the service process and of the evaluator process per decision
  cached        the same with the decision cache on and the same request repeated (what a
                benchmark or a hot route sees); ``-`` where the policy is not cacheable
Shapes: a one-rule policy, the OPA-Envoy tutorial (token verified in Rego, ``time.now_ns``), the
function style (``allow := decision({...input parts...})``), plain rules returning an object
(allowed/headers/body), the shipped ``policies/envoy`` and the quickstart's policy (reads
``x-role``: viewer). The JWT check is assumed done: ``input.jwt.claims`` is set as the ``jwt`` check
would set it.

    .venv/bin/python -m bench.rego [--seconds 0.4] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from envoy.service.auth.v3 import external_auth_pb2
from opa_bindings import OpaEngine, OpaUndefinedError

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
    (
        "OPA-Envoy tutorial",
        "bench.tutorial",
        TUTORIAL_STYLE.replace("package envoy.authz", "package bench.tutorial"),
    ),
    ("function style", "bench.function", FUNCTION_STYLE),
    ("object, plain rules", "bench.object", OBJECT_RULES),
    ("shipped envoy.authz", "envoy.authz", None),
    ("quickstart.authz", "quickstart.authz", None),
]


def check_request(package: str) -> external_auth_pb2.CheckRequest:
    """GET /people as Envoy sends it (headers, peers), routed to ``package``."""
    now = int(time.time())
    r = external_auth_pb2.CheckRequest()
    attrs = r.attributes
    h = attrs.request.http
    h.id, h.method, h.path, h.host, h.scheme, h.protocol = (
        "1234567890",
        "GET",
        "/people",
        "svc",
        "http",
        "HTTP/1.1",
    )
    token = hs256({"role": "guest", "sub": "YWxpY2U", "nbf": now - 60, "exp": now + 3600})
    for k, v in {
        ":authority": "svc",
        ":method": "GET",
        ":path": "/people",
        ":scheme": "http",
        "authorization": f"Bearer {token}",
        "user-agent": "wrk/4.2",
        "accept": "*/*",
        "x-forwarded-proto": "http",
        "x-role": "viewer",
        "x-request-id": "8a6e4bb6-54a1-4c4e-9a53-1c1f8b5e3c2d",
    }.items():
        h.headers[k] = v
    attrs.request.time.FromSeconds(now)
    attrs.source.address.socket_address.address = "127.0.0.1"
    attrs.source.address.socket_address.port_value = 51234
    attrs.destination.address.socket_address.address = "127.0.0.1"
    attrs.destination.address.socket_address.port_value = 10000
    attrs.context_extensions["policy"] = package
    return r


CLAIMS = {
    "iss": "https://bench.test",
    "aud": "legation",
    "sub": "alice",
    "role": "guest",
    "iat": 1700000000,
    "exp": 1900000000,
}


def context(request: external_auth_pb2.CheckRequest) -> RequestContext:
    ctx = RequestContext(request)
    ctx.claims, ctx.jwt_provider = dict(CLAIMS), "bench"
    return ctx


async def run_check(check: RegoCheck, request: external_auth_pb2.CheckRequest) -> Decision:
    return await check.check(context(request))


def _cpu_of(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def per_check(
    loop: asyncio.AbstractEventLoop,
    check: RegoCheck,
    request: external_auth_pb2.CheckRequest,
    seconds: float,
    rounds: int,
) -> tuple[float, float, float]:
    """(wall us, service CPU us, evaluator CPU us) per decision, medians over rounds."""

    async def many(n: int) -> None:
        for _ in range(n):
            await run_check(check, request)

    loop.run_until_complete(many(50))
    pool = loop.run_until_complete(check.store.pool())
    pids = [w.proc.pid for w in pool._workers]
    n = 50
    while True:
        t = time.perf_counter()
        loop.run_until_complete(many(n))
        if time.perf_counter() - t > seconds / 4:
            break
        n *= 2
    n = max(1, int(n * seconds / max(time.perf_counter() - t, 1e-9)))
    walls, cpus, children = [], [], []
    for _ in range(rounds):
        t, c = time.perf_counter(), time.process_time()
        e = sum(_cpu_of(p) for p in pids)
        loop.run_until_complete(many(n))
        walls.append((time.perf_counter() - t) / n * 1e6)
        cpus.append((time.process_time() - c) / n * 1e6)
        children.append((sum(_cpu_of(p) for p in pids) - e) / n * 1e6)
    return statistics.median(walls), statistics.median(cpus), statistics.median(children)


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


def regopy_api(
    directory: Path,
    package: str,
    document: dict[str, Any],
) -> Callable[[], Any] | None:
    """regopy's own API over the same modules, or None when regopy is not installed."""
    try:
        from regopy import Input, Interpreter
    except ImportError:
        return None
    interp = Interpreter()
    for path in sorted(directory.rglob("*.rego")):
        if not path.name.endswith("_test.rego"):
            interp.add_module(path.name, path.read_text())
    ep = package.replace(".", "/") + "/allow"
    bundle = interp.build(None, [ep])

    def call() -> Decision:
        interp.set_input(Input(document))
        out = interp.query_bundle_entrypoint(bundle, ep)
        if not out.ok():
            raise RuntimeError(str(out))
        exprs = out.results[0].expressions if out.results else []
        return decision_from_result(exprs[0] if exprs else None, where=package)

    return call


def opa_engine(
    directory: Path, check: RegoCheck, package: str, request: external_auth_pb2.CheckRequest
) -> Callable[[], Any]:
    """OPA's engine in this process, projected input ready: the evaluation alone."""
    engine = OpaEngine()
    for path in sorted(directory.rglob("*.rego")):
        if not path.name.endswith("_test.rego"):
            engine.add_policy(str(path), path.read_text())
    only = check._entrypoint(check._current(), package)[1]
    document = context(request).input(only)
    path = package + ".allow"

    def call() -> Any:
        try:
            return engine.eval_document(path, document)
        except OpaUndefinedError:
            return None

    return call


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=0.4, help="per round and row")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    loop = asyncio.new_event_loop()
    with tempfile.TemporaryDirectory(prefix="bench-rego-") as d:
        tmp = Path(d)
        for _, package, source in SHAPES:
            if source is not None:
                (tmp / f"{package.replace('.', '_')}.rego").write_text(source)

        def rego(directory: Path, cache: int) -> RegoCheck:
            check = RegoCheck(
                RegoConfig(
                    policy_dir=directory,
                    reload_interval_s=0,
                    decision_cache_size=cache,
                    evaluators=1,
                )
            )
            loop.run_until_complete(check.start())
            return check

        dirs = {True: tmp, False: REPO / "policies"}
        checks = {
            (src, cache): rego(dirs[src], cache) for src in (True, False) for cache in (0, 4096)
        }
        print(
            f"us per decision (median of {args.rounds} rounds of ~{args.seconds} s), "
            "GET /people, role guest; RegoCheck: wall / service CPU / evaluator CPU",
            flush=True,
        )
        print(
            f"  {'shape':22s} {'regopy':>8s} {'OPA engine':>10s} {'RegoCheck':>22s} "
            f"{'cached':>8s}   {'regopy/Check':>12s} {'Check/engine':>12s}"
        )
        for label, package, source in SHAPES:
            directory = dirs[source is not None]
            check, cached = checks[(source is not None, 0)], checks[(source is not None, 4096)]
            request = check_request(package)
            expected = loop.run_until_complete(run_check(check, request))
            assert loop.run_until_complete(run_check(cached, request)) == expected, label
            api_fn = regopy_api(directory, package, context(request).input())
            api = per_call_us(api_fn, args.seconds, args.rounds) if api_fn else None
            if api_fn is not None:
                assert api_fn() == expected, label
            eng = per_call_us(
                opa_engine(directory, check, package, request), args.seconds, args.rounds
            )
            wall, cpu, child = per_check(loop, check, request, args.seconds, args.rounds)
            hit = None
            if cached.cacheable(package):
                hit = per_check(loop, cached, request, args.seconds, args.rounds)[0]
            ours = f"{wall:.0f} / {cpu:.0f} / {child:.0f}"
            print(
                f"  {label:22s} {(f'{api:8.1f}' if api else '       -')} {eng:10.1f} "
                f"{ours:>22s} {(f'{hit:8.1f}' if hit else '       -')}   "
                f"{(f'{api / wall:12.2f}' if api else '           -')} {wall / eng:12.2f}",
                flush=True,
            )
        print(
            "\nbuilding the input alone (whole document, for comparison): "
            f"{per_call_us(lambda: build_input(check_request('x')), args.seconds, 1):.1f} us"
        )
        for c in checks.values():
            loop.run_until_complete(c.close())
    loop.close()


if __name__ == "__main__":
    sys.exit(main())
