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
        else:
            out.write(f"? e {_dumps('unknown operation')}\n")
        out.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
