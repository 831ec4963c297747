"""The policy evaluator process: OPA's own engine, one request at a time, killable.

Run as ``python -m legation.extauthz._evaluator`` by :mod:`legation.extauthz.evaluator`. Rego runs
here rather than in the service for three reasons: an evaluation can be stopped (the parent kills
this process when a check's deadline passes, so a runaway policy costs at most the deadline in
CPU), it runs beside the service's event loop instead of on it (one slow policy does not stall
other requests), and the Go runtime inside ``opa-golib-python-bindings`` never meets ``fork``.

Protocol, one line per message in both directions (JSON never contains a raw newline):

    parent: ``L <json>``   load ``{"modules": [[path, text]...], "data": [[path, json, at]...]}``
    child:  ``L ok`` | ``L err <json message>``
    parent: ``E <id> <path> <input json>``   evaluate ``data.<path>`` (dotted) with that input
    child:  ``<id> v <value json>`` | ``<id> u`` (undefined) | ``<id> e <json message>``

``legation policy test`` (:mod:`legation.extauthz.policy_test`) adds two operations:

    parent: ``P <json>``   parse ``{"modules": [[path, text]...]}`` (no load needed) for test rules
    child:  ``P ok <json>`` ``[[path, package, [rule...]]...]`` | ``P err <json message>``
    parent: ``T <id> <json>``   run one test rule ``{"path", "coverage", "cases"}``
    child:  ``<id> t <json>``   ``{"value"|"undefined"|"error", "ns", "prints", "coverage",
            "cases"}``

A ``P`` rule is ``{"ref", "name", "skip", "key"}``: the rule's name as `opa test` prints it (the
head's ground prefix up to the ``test_``/``todo_test_`` term), that term, whether it is a
``todo_`` test, and the head's remaining terms (the case key of a parameterized test, else
``[]``); it comes from OPA's own parser (``rego.parse_module``), in file order. ``T`` evaluates
``data.<path>`` with an empty input; ``"coverage": true`` returns ``{file: [covered rows, not
covered rows]}``; ``"cases": {"at": "file:row", "key": [terms]}`` traces the evaluation and
returns every case key the rule's body bound (``[[k1, k2...]...]``), so that a case whose body
failed is reported as OPA's tester reports it, not silently dropped.

The input arrives as JSON text and goes to the engine as a parsed value: no string is ever pasted
into Rego. A module that calls a function the engine does not know (``net.cidr_contain``) is a
type error when the modules are compiled, so loading refuses it with the file and line. Builtin
errors at evaluation time (``net.cidr_contains("garbage", ...)``, ``1 / 0``) are errors, not
undefined: the parent denies.
"""

from __future__ import annotations

import json
import sys
from typing import Any


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _load(engine_cls: Any, error_cls: Any, spec: dict[str, Any]) -> tuple[Any, str | None]:
    engine = engine_cls()
    engine.print_handler = lambda message, location: None  # print() in a policy: dropped
    try:
        for path, text in spec["modules"]:
            engine.add_policy(path, text)
        for path, text, at in spec["data"]:
            try:
                value = json.loads(text)
            except ValueError as e:
                return None, f"{path}: not valid JSON: {e}"
            if not at and not isinstance(value, dict):
                return None, f"{path}: a data document at the root must be an object"
            for key in reversed(at):  # roles/data.json is data.roles, as in an OPA bundle
                value = {key: value}
            try:
                engine.add_data(value)
            except error_cls as e:
                return None, f"{path}: {_describe(e)}"
        # compiling happens on the first evaluation: do one now, so that every module's type
        # errors (unknown functions among them) refuse the load instead of a request
        engine.eval_query("true")
    except error_cls as e:
        return None, _describe(e)
    return engine, None


def _describe(e: Any) -> str:
    """OPA's message without the envelope ("prepare_error: bundle activation failed: 1 error
    occurred: p.rego:3: rego_type_error: undefined function net.foo") -> the located part."""
    text = str(getattr(e, "message", e))
    for marker in ("error occurred: ", "errors occurred:"):
        if marker in text:
            text = text.split(marker, 1)[1]
            break
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return "; ".join(lines) if lines else str(e)


class _Out:
    def __init__(self, buffer: Any) -> None:
        self._buffer = buffer

    def write(self, text: str) -> None:
        self._buffer.write(text.encode("utf-8", "surrogatepass"))

    def flush(self) -> None:
        self._buffer.flush()


def _die_with_parent() -> None:
    """Linux: SIGKILL this process when the service that started it dies, so that no evaluation
    outlives it (a runaway one included)."""
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _limit_memory() -> None:
    """Cap this process's data segment (``LEGATION_EVALUATOR_MEMORY_MB``): a policy that builds
    huge values fails here (the parent denies and replaces the process) instead of growing
    until the kernel's OOM killer picks a victim, which could be the service."""
    import os
    import resource

    mb = int(os.environ.get("LEGATION_EVALUATOR_MEMORY_MB", "0") or 0)
    if mb > 0:
        limit = mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))


def main() -> int:
    _die_with_parent()
    _limit_memory()
    from opa_bindings import OpaEngine, OpaError, OpaUndefinedError

    from legation.extauthz import _evaluator_tests as _tests

    out = _Out(sys.stdout.buffer)
    engine: Any = None
    for raw in sys.stdin.buffer:  # bytes: only b"\n" ends a line
        op, _, rest = raw.rstrip(b"\n").decode("utf-8", "replace").partition(" ")
        if op == "L":
            engine, error = _load(OpaEngine, OpaError, json.loads(rest))
            out.write("L ok\n" if error is None else f"L err {_dumps(error)}\n")
        elif op == "E":
            ident, _, rest = rest.partition(" ")
            path, _, document = rest.partition(" ")
            if engine is None:
                out.write(f"{ident} e {_dumps('no policies loaded')}\n")
            else:
                try:
                    value = engine.eval_document(path, json.loads(document))
                    out.write(f"{ident} v {_dumps(value)}\n")
                except OpaUndefinedError:
                    out.write(f"{ident} u\n")
                except OpaError as e:
                    out.write(f"{ident} e {_dumps(_describe(e))}\n")
                except ValueError as e:  # input that is not JSON: the parent never sends it
                    out.write(f"{ident} e {_dumps(f'bad input: {e}')}\n")
        elif op == "P":
            try:
                found = _tests.parse(OpaEngine(), json.loads(rest)["modules"])
                out.write(f"P ok {_dumps(found)}\n")
            except OpaError as e:
                out.write(f"P err {_dumps(_describe(e))}\n")
        elif op == "T":
            ident, _, rest = rest.partition(" ")
            if engine is None:
                answer: dict[str, Any] = {"error": "no policies loaded"}
            else:
                answer = _tests.run(
                    engine, json.loads(rest), OpaError, OpaUndefinedError, _describe
                )
            out.write(f"{ident} t {_dumps(answer)}\n")
        else:
            out.write(f"? e {_dumps('unknown operation')}\n")
        out.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
