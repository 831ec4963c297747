"""Each request-path handler's own CPU per call, in process (no network, no gRPC server).

    .venv/bin/python -m bench.handlers [NAME ...] [--calls 5000] [--runs 7] [--profile]

What ``bench/floor.py`` and ``bench/fused.py`` cannot resolve on a shared machine (a few us per
call under 10-30 % noise between rounds): the handler's Python alone, best of ``--runs`` runs of
``--calls`` calls, CPU time (``time.process_time``), after a warm-up. Rows:

  authz-allow      ext_authz gRPC ``Check``, serialized as the server sends it, with
                   bench/floor.py's check that always allows
  authz-jwt-rego   ``Check`` with a JWT (RS256, verified once, then cached) and Rego
                   (bench/fused.py's policy, decision cache hit), a CheckRequest as Envoy's
  http-allow       the HTTP call-out (``CalloutApp``) with the allow check
  http-jwt-rego    the HTTP call-out with JWT + Rego, as bench/fused.py's ``authz-http`` row
  rl-memory        ``ShouldRateLimit`` as the server calls it (bytes in, bytes out), memory
                   backend, bench/floor.py's limit (never reached)
  proc-noop        one ext_proc ``Process`` stream (request headers, then the end) through
                   bench/floor.py's no-op chain
  proc-route       the same through a ``header_route`` chain

The gRPC context is a stand-in (metadata, a read queue, the written answers): what is measured
is what runs above grpc.aio's server. Every row's answer is checked to be an allow (continue)
before it is timed. ``--profile`` prints cProfile's top entries per row.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import pstats
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import jwt as pyjwt
from cryptography.hazmat.primitives.asymmetric import rsa
from envoy.service.auth.v3 import external_auth_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ratelimit.v3 import rls_pb2
from prometheus_client import CollectorRegistry

from bench import floor
from bench.fused import POLICY

Case = Callable[[], Awaitable[Any]]


class _Context:
    """What the handlers use of a grpc.aio ServicerContext."""

    def __init__(self, metadata: tuple[tuple[str, str], ...] = ()) -> None:
        self.metadata, self.inbox, self.written = metadata, list[Any](), list[Any]()

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self.metadata

    async def read(self) -> Any:
        return self.inbox.pop() if self.inbox else grpc.aio.EOF

    async def write(self, message: Any) -> None:
        self.written.append(message)

    async def abort(self, *args: Any) -> None:
        raise RuntimeError(args)


def _authz_config() -> tuple[str, dict[str, Any]]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = json.loads(pyjwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    jwk = {**public, "kid": "k", "alg": "RS256", "use": "sig"}
    claims = {"iss": "bench", "sub": "u", "exp": int(time.time()) + 86400}
    token = pyjwt.encode(claims, key, algorithm="RS256", headers={"kid": "k"})
    policies = Path(tempfile.mkdtemp()) / "policies"
    policies.mkdir()
    (policies / "authz.rego").write_text(POLICY)
    provider = {"name": "b", "issuer": "bench", "audiences": "any", "jwks": {"keys": [jwk]}}
    checks = {
        "jwt": {"type": "jwt", "options": {"providers": [provider]}},
        "rego": {"type": "rego", "options": {"policy_dir": str(policies)}},
        "allow": {"type": "allow"},
    }
    return token, {"checks": checks}


def _check_request(token: str, policy: str, checks: str) -> external_auth_pb2.CheckRequest:
    """A CheckRequest as Envoy's gRPC ext_authz sends one for a GET."""
    r = external_auth_pb2.CheckRequest()
    a = r.attributes
    for peer, port in ((a.source, 40000), (a.destination, 10000)):
        peer.address.socket_address.address = "127.0.0.1"
        peer.address.socket_address.port_value = port
    a.request.time.FromSeconds(1700000000)
    h = a.request.http
    h.id, h.method, h.path, h.host, h.scheme, h.protocol = (
        "1",
        "GET",
        "/authz/x?y=1",
        "gw.example",
        "http",
        "HTTP/1.1",
    )
    h.headers.update(
        {
            ":authority": "gw.example",
            ":method": "GET",
            ":path": "/authz/x?y=1",
            "authorization": f"Bearer {token}",
            "x-role": "admin",
            "x-user": "bob",
            "user-agent": "wrk",
            "accept": "*/*",
            "x-forwarded-proto": "http",
            "x-request-id": "8a0c1f2e-1111-2222-3333-444455556666",
        }
    )
    a.context_extensions.update({"policy": policy, "checks": checks})
    return r


async def _authz_cases(cases: dict[str, Case]) -> None:
    from legation._protowire import serialize
    from legation.extauthz import service as authz
    from legation.fastpath._http import Call
    from legation.fastpath.contract import CHECKS_HEADER, PATH_PREFIX, POLICY_HEADER
    from legation.fastpath.server import CalloutApp

    floor._register_plugins()
    token, config = _authz_config()
    servicer = await authz.build_servicer(
        authz.Settings(config=config, registry=CollectorRegistry())
    )
    context = _Context()
    allow, jwt_rego = (
        _check_request(token, "floor", "allow"),
        _check_request(token, "bench.authz", "jwt,rego"),
    )

    async def wire(request: Any) -> bytes:  # what the gRPC server runs and sends
        return serialize(await servicer.check_wire(request, context))

    cases["authz-allow"] = lambda: wire(allow)
    cases["authz-jwt-rego"] = lambda: wire(jwt_rego)
    app = CalloutApp(servicer)

    def call(policy: bytes, checks: bytes, *headers: tuple[bytes, bytes]) -> Call:
        return Call(
            b"GET",
            PATH_PREFIX.encode() + b"/authz/x?y=1",
            [
                (b"host", b"gw.example"),
                *headers,
                (b"x-envoy-expected-rq-timeout-ms", b"1000"),
                (b"content-length", b"0"),
                (POLICY_HEADER.encode(), policy),
                (CHECKS_HEADER.encode(), checks),
            ],
            b"",
            True,
        )

    async def answer(c: Call) -> bytes:
        out = app(c)
        return out if isinstance(out, bytes) else await out

    http_allow = call(b"floor", b"allow")
    http_jwt_rego = call(
        b"bench.authz",
        b"jwt,rego",
        (b"authorization", b"Bearer " + token.encode()),
        (b"x-role", b"admin"),
        (b"x-user", b"bob"),
        (b"x-request-id", b"8a0c1f2e-1111-2222-3333-444455556666"),
    )
    cases["http-allow"] = lambda: answer(http_allow)
    cases["http-jwt-rego"] = lambda: answer(http_jwt_rego)


def _ratelimit_cases(cases: dict[str, Case]) -> None:
    from legation.ratelimit import service as rl
    from legation.ratelimit.metrics import RateLimitMetrics
    from legation.ratelimit.watch import ConfigWatcher

    limits = Path(tempfile.mkdtemp()) / "limits.yaml"
    limits.write_text(floor.LIMITS)
    settings = rl.Settings(config_files=(str(limits),), registry=CollectorRegistry())
    metrics = RateLimitMetrics.for_registry(settings.registry)
    config = ConfigWatcher(settings.config_files, lambda c: None, metrics=metrics).load()
    servicer = rl.RateLimitServicer(rl.build_limiter(settings, config))
    request = rls_pb2.RateLimitRequest(domain="floor", hits_addend=1)
    entry = request.descriptors.add().entries.add()
    entry.key, entry.value = "generic_key", "floor"
    context = _Context()
    raw = request.SerializeToString()
    cases["rl-memory"] = lambda: servicer.answer_wire(raw, context)  # type: ignore[arg-type]


def _extproc_cases(cases: dict[str, Case]) -> None:
    from bench.fused import COHORT
    from legation.extproc.config import CHAIN_METADATA_KEY, build_chains
    from legation.extproc.metrics import Metrics
    from legation.extproc.servicer import ExtProcServicer

    chains = build_chains(
        {"chains": {floor.CHAIN: {"filters": [{"name": "noop"}]}, "route": {"filters": COHORT}}}
    )
    servicer = ExtProcServicer(chains, metrics=Metrics(CollectorRegistry()), message_timeout=0.2)
    message = pb.ProcessingRequest()
    message.request_headers.end_of_stream = True
    for key, value in (
        (":authority", "gw"),
        (":path", "/x"),
        (":method", "GET"),
        (":scheme", "http"),
        ("user-agent", "wrk"),
        ("x-user", "alice"),
        ("x-request-id", "abc"),
    ):
        message.request_headers.headers.headers.add(key=key, raw_value=value.encode())

    async def stream(chain: str) -> Any:
        context = _Context(((CHAIN_METADATA_KEY, chain),))
        context.inbox.append(message)
        await servicer.Process(None, context)  # type: ignore[arg-type]
        return context.written[-1]

    cases["proc-noop"] = lambda: stream(floor.CHAIN)
    cases["proc-route"] = lambda: stream("route")


def _allowed(name: str, result: Any) -> bool:
    if isinstance(result, bytes) and result.startswith(b"HTTP/"):
        return result.startswith(b"HTTP/1.1 200 ")
    if isinstance(result, bytes) and name.startswith("rl-"):
        result = rls_pb2.RateLimitResponse.FromString(result)
    elif isinstance(result, bytes) and name.startswith("proc-"):
        result = pb.ProcessingResponse.FromString(result)
    elif isinstance(result, bytes):  # a serialized CheckResponse
        result = external_auth_pb2.CheckResponse.FromString(result)
    if isinstance(result, external_auth_pb2.CheckResponse):
        return result.status.code == 0 and not result.HasField("denied_response")
    if isinstance(result, rls_pb2.RateLimitResponse):
        return result.overall_code == rls_pb2.RateLimitResponse.OK
    return isinstance(result, pb.ProcessingResponse) and result.HasField("request_headers")


async def _main(args: argparse.Namespace) -> None:
    cases: dict[str, Case] = {}
    await _authz_cases(cases)
    _ratelimit_cases(cases)
    _extproc_cases(cases)
    unknown = set(args.names) - set(cases)
    if unknown:
        raise SystemExit(f"unknown rows {sorted(unknown)}; rows: {', '.join(cases)}")
    for name, case in cases.items():
        if args.names and name not in args.names:
            continue
        for _ in range(500):
            result = await case()
        if not _allowed(name, result):
            raise SystemExit(f"{name}: not an allow: {result!r}"[:400])
        best = float("inf")
        for _ in range(args.runs):
            start = time.process_time()
            for _ in range(args.calls):
                await case()
            best = min(best, (time.process_time() - start) / args.calls * 1e6)
        print(f"{name:16s} {best:6.1f} us/call", flush=True)
        if args.profile:
            profile = cProfile.Profile()
            profile.enable()
            for _ in range(args.calls):
                await case()
            profile.disable()
            pstats.Stats(profile).sort_stats("tottime").print_stats(18)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="rows to run (default: all)")
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--profile", action="store_true")
    asyncio.run(_main(parser.parse_args()))


if __name__ == "__main__":
    main()
