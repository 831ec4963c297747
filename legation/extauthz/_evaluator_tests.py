"""The evaluator's side of ``legation policy test``: the ``P`` and ``T`` operations.

Runs inside the evaluator process (:mod:`legation.extauthz._evaluator`), next to OPA's engine.
``parse`` finds the test rules with OPA's own parser; ``run`` evaluates one and says what
`opa test` needs to judge it: the value (or undefined, or the error), the evaluation time, what
``print`` wrote, the coverage of this evaluation, and the case keys a parameterized test bound.
"""

from __future__ import annotations

import re
import time
from typing import Any

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
TEST_PREFIX = "test_"
SKIP_PREFIX = "todo_test_"


def _render(terms: list[dict[str, Any]]) -> str:
    """A ground ref as OPA prints it: ``a.test_b``, ``a["test-c"]``."""
    out = str(terms[0]["value"])
    for term in terms[1:]:
        name = str(term["value"])
        out += f".{name}" if _IDENT.fullmatch(name) else f'["{name}"]'
    return out


def _test_rule(head: dict[str, Any]) -> dict[str, Any] | None:
    """The rule's test name, like OPA's tester: walk the head's ground prefix and stop at the
    first term named ``test_*`` or ``todo_test_*``; a head with neither is no test."""
    ref = head.get("ref") or [{"type": "var", "value": head.get("name", "")}]
    for i, term in enumerate(ref):
        if term.get("type") not in ("var", "string"):
            break  # the ground prefix ends here
        name = str(term["value"])
        if name.startswith((TEST_PREFIX, SKIP_PREFIX)):
            return {
                "ref": _render(ref[: i + 1]),
                "name": name,
                "skip": name.startswith(SKIP_PREFIX),
                "key": ref[i + 1 :],
            }
    return None


def parse(engine: Any, modules: list[list[str]]) -> list[list[Any]]:
    found: list[list[Any]] = []
    for path, text in modules:
        rows = engine.eval_query(
            "m := rego.parse_module(input.path, input.text)", {"path": path, "text": text}
        )
        module = rows[0]["m"] if rows else {}
        package = ".".join(str(t["value"]) for t in module.get("package", {}).get("path", [])[1:])
        rules = [
            r
            for r in (_test_rule(rule.get("head", {})) for rule in module.get("rules", []))
            if r is not None
        ]
        found.append([path, package, rules])
    return found


def _term_value(term: dict[str, Any], scope: dict[str, Any]) -> tuple[bool, Any]:
    """A head key term's value in the body's bindings: a var, a ref ``tc.note`` from a bound
    var, or a scalar; (False, None) while it is not bound (or not something we can read)."""
    kind, value = term.get("type"), term.get("value")
    if kind in ("string", "number", "boolean", "null"):
        return True, value
    if kind == "var":
        return (True, scope[value]) if value in scope else (False, None)
    if kind == "ref" and value and value[0].get("type") == "var" and value[0]["value"] in scope:
        current = scope[value[0]["value"]]
        for part in value[1:]:
            if part.get("type") not in ("string", "number"):
                return False, None
            key = part["value"]
            if isinstance(current, dict) and key in current:
                current = current[key]
            elif isinstance(current, list) and isinstance(key, int) and 0 <= key < len(current):
                current = current[key]
            else:
                return False, None
        return True, current
    return False, None


def _cases(trace: list[dict[str, Any]], at: str, key: list[dict[str, Any]]) -> list[list[Any]]:
    """Every key tuple the test rule's body (the queries entered at ``at``) bound, in order."""
    queries = {
        e.get("query_id") for e in trace if e.get("op") == "Enter" and e.get("location") == at
    }
    seen: list[list[Any]] = []
    for event in trace:
        scope = event.get("locals")
        if not scope or event.get("query_id") not in queries:
            continue
        values = [_term_value(term, scope) for term in key]
        if all(bound for bound, _ in values):
            case = [v for _, v in values]
            if case not in seen:
                seen.append(case)
    return seen


def _rows(coverage: dict[str, Any] | None) -> dict[str, list[list[int]]]:
    out: dict[str, list[list[int]]] = {}
    for path, report in ((coverage or {}).get("files") or {}).items():
        sides = []
        for field in ("covered", "not_covered"):
            rows: set[int] = set()
            for span in report.get(field) or []:
                rows.update(range(span["start"]["row"], span["end"]["row"] + 1))
            sides.append(sorted(rows))
        out[path] = sides
    return out


def run(
    engine: Any, spec: dict[str, Any], error_cls: Any, undefined_cls: Any, describe: Any
) -> dict[str, Any]:
    cases = spec.get("cases")
    answer: dict[str, Any] = {}
    started = time.perf_counter_ns()
    try:
        value = engine.eval_document(
            spec["path"], None, coverage=bool(spec.get("coverage")), trace=cases is not None
        )
        answer["value"] = value
    except undefined_cls:
        answer["undefined"] = True
    except error_cls as e:
        answer["error"] = describe(e)
    answer["ns"] = time.perf_counter_ns() - started
    answer["prints"] = [message for message, _ in engine.last_prints]
    if spec.get("coverage"):
        answer["coverage"] = _rows(engine.last_coverage)
    if cases is not None and engine.last_trace is not None:
        answer["cases"] = _cases(engine.last_trace, cases["at"], cases["key"])
    return answer
