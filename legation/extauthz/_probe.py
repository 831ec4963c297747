"""Evaluate policies in a child process, so that an engine crash cannot take the caller with it.

regopy (rego-cpp) can abort the whole process on some programs (1.5.2: ``X with input as {...}``
where ``X`` depends on another rule aborts with "shape rego-localref has no field rego-refhead").
So a policy bundle is compiled and evaluated once here, in ``python -m legation.extauthz._probe``,
before it may replace the running one, and ``legation policy test`` runs its tests here too.
Nothing on the request path goes through a child process.

Protocol: the parent writes one JSON object to the child's stdin (the sources, the rules to
compile, the entry points and the inputs to evaluate them with); the child writes JSON lines:
``{"compile_error": msg}``, or ``{"start": ep}`` before and ``{"done": ep, ...}`` after each
evaluation, so a child that dies names the entry point that killed it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from legation.extauthz.policies import Sources


@dataclass(frozen=True)
class Outcome:
    entrypoint: str
    ok: bool  # False: an evaluation error (the engine survived)
    text: str  # the result JSON, "undefined", or the error
    ms: float


@dataclass(frozen=True)
class Crash:
    entrypoint: str | None  # None: before any evaluation started (while compiling)
    reason: str


@dataclass
class ProbeResult:
    outcomes: list[Outcome] = field(default_factory=list)
    compile_error: str | None = None
    crash: Crash | None = None


def representative_input() -> dict[str, Any]:
    """An opa-envoy-plugin input document for a typical authenticated GET, as Envoy sends it."""
    from envoy.service.auth.v3 import external_auth_pb2

    from legation.extauthz.request import build_input

    r = external_auth_pb2.CheckRequest()
    a = r.attributes
    for peer, port in ((a.source, 50000), (a.destination, 10000)):
        peer.address.socket_address.address = "127.0.0.1"
        peer.address.socket_address.port_value = port
    h = a.request.http
    h.id, h.method, h.path, h.host = "1", "GET", "/probe/path?q=1", "probe.local"
    h.scheme, h.protocol = "http", "HTTP/1.1"
    for k, v in {":authority": "probe.local", ":method": "GET", ":path": "/probe/path?q=1",
                 "authorization": "Bearer e30.e30.", "content-type": "application/json",
                 "user-agent": "legation-probe", "x-request-id": "probe"}.items():
        h.headers[k] = v
    a.request.time.FromSeconds(1_700_000_000)
    a.context_extensions["policy"] = "probe"
    doc = build_input(r)
    doc["parsed_body"] = {"probe": True}
    doc["jwt"] = {"provider": "probe", "claims": {
        "iss": "https://probe.local", "sub": "probe", "aud": "probe", "role": "guest",
        "exp": 1_700_003_600, "iat": 1_700_000_000}}
    return doc


def run(sources: Sources, *, rules: Sequence[str] = (), tests: bool = False,
        entrypoints: Sequence[str] | None = None, inputs: Sequence[dict[str, Any]] = ({},),
        timeout_s: float = 10.0) -> ProbeResult:
    """In a child process: compile ``sources`` with an entry point per package and rule (and
    test rule, with ``tests``), or with exactly ``entrypoints`` when given, then evaluate each
    entry point with each of ``inputs``. Blocking; async callers use ``asyncio.to_thread``."""
    request = {"sources": sources.to_json(), "rules": list(rules), "tests": tests,
               "entrypoints": None if entrypoints is None else list(entrypoints),
               "inputs": list(inputs)}
    proc = subprocess.Popen([sys.executable, "-m", "legation.extauthz._probe"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, encoding="utf-8", errors="replace",
                            env={**os.environ, "PYTHONIOENCODING": "utf-8"})
    timed_out = False
    try:
        stdout, stderr = proc.communicate(json.dumps(request), timeout=timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
        proc.kill()
        stdout, stderr = proc.communicate()
    result = ProbeResult()
    running: str | None = None
    for line in stdout.splitlines():
        try:
            msg = json.loads(line)
        except ValueError:
            continue  # a torn last line from a dying child
        if "compile_error" in msg:
            result.compile_error = str(msg["compile_error"])
        elif "start" in msg:
            running = str(msg["start"])
        elif "done" in msg:
            result.outcomes.append(Outcome(str(msg["done"]), bool(msg["ok"]), str(msg["text"]),
                                           float(msg["ms"])))
            running = None
    if timed_out:
        result.crash = Crash(running, f"timed out after {timeout_s:g} s")
    elif proc.returncode != 0 and result.compile_error is None:
        result.crash = Crash(running, _describe(proc.returncode, stderr))
    return result


def _describe(returncode: int, stderr: str) -> str:
    if returncode < 0:
        try:
            how = f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            how = f"killed by signal {-returncode}"
    else:
        how = f"exit status {returncode}"
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    detail = next((ln for ln in reversed(lines) if "what()" in ln), lines[-1] if lines else "")
    detail = detail.removeprefix("what():").strip()[:300]
    return f"the policy engine crashed ({how})" + (f": {detail}" if detail else "")


def _emit(msg: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(msg) + "\n")
    sys.stdout.flush()  # the parent must see "start" even if the next call aborts


def main() -> int:
    from regopy import Interpreter, RegoError

    from legation.errors import ConfigError
    from legation.extauthz import _regofast
    from legation.extauthz.policies import Sources, compile_sources

    request = json.load(sys.stdin)
    entrypoints = request["entrypoints"]
    try:
        if entrypoints is None:
            compiled = compile_sources(Sources.from_json(request["sources"]),
                                       rules=request["rules"], tests=request["tests"])
            entrypoints = sorted(compiled.entrypoints)
        else:
            compiled = compile_sources(Sources.from_json(request["sources"]), rules=(),
                                       entrypoints=entrypoints)
    except ConfigError as e:
        _emit({"compile_error": str(e)})
        return 1
    for ep in entrypoints:
        for document in request["inputs"]:
            _emit({"start": ep})
            started = time.perf_counter()
            interp = Interpreter()
            try:
                _regofast.set_input(interp, document)
                ok, text = _regofast.query(interp, compiled.bundle, ep.encode())
            except RegoError as e:
                ok, text = False, str(e)
            _emit({"done": ep, "ok": ok, "text": text,
                   "ms": (time.perf_counter() - started) * 1000})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
