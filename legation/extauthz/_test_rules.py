"""``legation policy test``'s two pure halves: which rules are tests (found by OPA's parser in an
evaluator process, duplicates numbered as OPA numbers them), and how an evaluator's answer for
one test becomes a reported result (pass, fail, error, and the cases of a parameterized test)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from legation.extauthz import _test_report as report
from legation.extauthz.evaluator import parse_tests

_DUPLICATE = "__legation_test_{:02d}"  # the engine's name for the k-th body of a test rule


@dataclass(frozen=True)
class TestRule:
    file: str
    row: int
    col: int
    package: str  # dotted, without "data."
    name: str  # as reported: "test_x", "test_x#01", "p.test_y"
    query: str  # the dotted path the engine evaluates
    skip: bool
    key: tuple[Any, ...]  # head terms after the name: the case key of a parameterized test


def _head(text: str, ref: str, start: int) -> re.Match[str] | None:
    """The next line at or after ``start`` that declares rule ``ref`` (``test_x if``,
    ``default test_x :=``, ``test_x[note] if``, ``p.test_y contains``)."""
    pattern = (
        r"^[ \t]*(?:default[ \t]+)?("
        + re.escape(ref)
        + r")(?![\w])(?=[ \t]*(?:\[|\(|:=|=|\{|if\b|contains\b|#|$))"
    )
    return re.compile(pattern, re.MULTILINE).search(text, start)


def discover(
    modules: tuple[tuple[str, str], ...],
    *,
    timeout_s: float = 30.0,
) -> tuple[list[TestRule], tuple[tuple[str, str], ...]]:
    """The test rules in file order, and the modules to load: the same text, except that the
    second and later bodies of one test name are renamed (same line, so locations and coverage
    rows stay), so that each runs on its own as in `opa test`."""
    parsed = parse_tests(modules, timeout_s=timeout_s)
    rules: list[TestRule] = []
    texts = dict(modules)
    seen: dict[str, int] = {}
    for path, package, found in parsed:
        text = texts[path]
        edits: list[tuple[int, int, str]] = []
        cursor = 0
        for rule in found:
            m = _head(text, rule["ref"], cursor)
            row = col = 0
            if m is not None:
                cursor = m.end()
                line_start = text.rfind("\n", 0, m.start(1)) + 1
                row = text.count("\n", 0, m.start(1)) + 1
                line = text[line_start : m.end(1)]
                col = len(line) - len(line.lstrip(" \t")) + 1
            name, query = rule["ref"], f"{package}.{rule['ref']}"
            if not rule["skip"]:
                k = seen.get(query, 0)
                seen[query] = k + 1
                if k and m is not None:
                    stem = rule["ref"][: len(rule["ref"]) - len(rule["name"])]
                    name = f"{stem}{rule['name']}#{k:02d}"
                    renamed = rule["name"] + _DUPLICATE.format(k)
                    query = f"{package}.{stem}{renamed}"
                    edits.append((m.end(1) - len(rule["name"]), m.end(1), renamed))
            rules.append(
                TestRule(
                    file=path,
                    row=row,
                    col=col,
                    package=f"data.{package}",
                    name=name,
                    query=query,
                    skip=bool(rule["skip"]),
                    key=tuple(rule["key"]),
                )
            )
        for start, end, new in reversed(edits):
            text = text[:start] + new + text[end:]
        texts[path] = text
    return rules, tuple((path, texts[path]) for path, _ in modules)


def _case_name(value: Any) -> str:
    """A case key as OPA names it: a string as is, anything else as JSON."""
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"), sort_keys=True, ensure_ascii=False)


def _sub_results(value: Any) -> tuple[bool, dict[str, report.SubResult]]:
    if not isinstance(value, dict):
        return True, {}
    fail, subs = False, {}
    for key, v in value.items():
        if isinstance(v, dict):
            nested_fail, nested = _sub_results(v)
            sr = report.SubResult(key, nested_fail, nested)
        else:
            sr = report.SubResult(key, v is not True)
        subs[key] = sr
        fail = fail or sr.fail
    return fail, subs


def _add_case(subs: dict[str, report.SubResult], path: list[str]) -> bool:
    """A case the body reached: one missing from the result is a failed case."""
    entry = subs.get(path[0])
    if entry is None:
        entry = subs[path[0]] = report.SubResult(path[0], True)
    if len(path) == 1:
        return entry.fail
    if _add_case(entry.sub, path[1:]):
        entry.fail = True
    return entry.fail


def judge(rule: TestRule, answer: dict[str, Any]) -> report.Result:
    result = report.Result(
        file=rule.file,
        row=rule.row,
        col=rule.col,
        package=rule.package,
        name=rule.name,
        ns=int(answer.get("ns", 0)),
        output="".join(f"{p}\n" for p in answer.get("prints", [])),
    )
    if "error" in answer:
        result.error = str(answer["error"])
    elif answer.get("undefined"):
        result.fail = True
    elif rule.key:
        result.fail, result.sub = _sub_results(answer.get("value"))
        for case in answer.get("cases", []):
            if _add_case(result.sub, [_case_name(v) for v in case]):
                result.fail = True
    else:
        result.fail = answer.get("value") is not True
    return result
