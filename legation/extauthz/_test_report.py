"""Test results as `opa test` reports them: the pretty text, ``--format json`` and the coverage.

What a result is (:class:`Result`, :class:`SubResult`), how it is counted and printed follow the
behaviour of OPA's ``tester`` package (its pretty, JSON and coverage reporters); this is our own
code, written from reading what they do.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, TextIO

RULE = "-" * 80


@dataclass
class SubResult:
    """One case of a parameterized test (``test_x[note] if ...``), maybe with nested cases."""

    name: str
    fail: bool = False
    sub: dict[str, SubResult] = field(default_factory=dict)


@dataclass
class Result:
    file: str
    row: int
    col: int
    package: str  # "data.a.b"
    name: str  # "test_x", "test_x#01", "p.test_y"
    ns: int = 0
    fail: bool = False
    skip: bool = False
    error: str | None = None
    sub: dict[str, SubResult] = field(default_factory=dict)
    output: str = ""

    @property
    def passed(self) -> bool:
        return not self.fail and not self.skip and self.error is None

    @property
    def outcome(self) -> str:
        if self.passed:
            return "PASS"
        return "FAIL" if self.fail else "SKIPPED" if self.skip else "ERROR"

    def line(self) -> str:
        head = f"{self.package}.{self.name}: {self.outcome}"
        return head if self.skip else f"{head} ({go_duration(self.ns)})"


def walk(subs: dict[str, SubResult], depth: int = 0) -> Iterator[tuple[int, SubResult]]:
    """Depth first, keys sorted (as OPA prints them, for stable output)."""
    for key in sorted(subs):
        yield depth, subs[key]
        yield from walk(subs[key].sub, depth + 1)


def go_duration(ns: int) -> str:
    """Go's ``time.Duration.String()``: ``0s``, ``850ns``, ``1.5µs``, ``2.25ms``, ``3s``,
    ``1m30.5s``."""
    if ns == 0:
        return "0s"
    sign, ns = ("-", -ns) if ns < 0 else ("", ns)

    def fraction(value: int, unit: int) -> str:
        whole, rest = divmod(value, unit)
        digits = str(rest).rjust(len(str(unit)) - 1, "0").rstrip("0")
        return f"{whole}.{digits}" if digits else str(whole)

    if ns < 1_000:
        return f"{sign}{ns}ns"
    if ns < 1_000_000:
        return f"{sign}{fraction(ns, 1_000)}µs"
    if ns < 1_000_000_000:
        return f"{sign}{fraction(ns, 1_000_000)}ms"
    hours, ns = divmod(ns, 3_600_000_000_000)
    minutes, ns = divmod(ns, 60_000_000_000)
    seconds = fraction(ns, 1_000_000_000) + "s"
    if hours:
        return f"{sign}{hours}h{minutes}m{seconds}"
    return f"{sign}{minutes}m{seconds}" if minutes else f"{sign}{seconds}"


def counts(results: list[Result]) -> dict[str, int]:
    """PASS/FAIL/SKIPPED/ERROR as OPA counts them: a parameterized test counts its leaf cases."""
    n = {"PASS": 0, "FAIL": 0, "SKIPPED": 0, "ERROR": 0}
    for r in results:
        if r.skip:
            n["SKIPPED"] += 1
        elif r.error is not None:
            n["ERROR"] += 1
        elif r.sub:
            for _, sr in walk(r.sub):
                if not sr.sub:
                    n["FAIL" if sr.fail else "PASS"] += 1
        elif r.passed:
            n["PASS"] += 1
        else:
            n["FAIL"] += 1
    return n


def _indent(text: str, spaces: int) -> str:
    return "".join(" " * spaces + ln for ln in text.splitlines(keepends=True))


def pretty(results: list[Result], out: TextIO, *, verbose: bool) -> None:
    """Each reported test as ``file:row:`` then ``data.pkg.test_x: FAIL (1.2ms)`` (every test
    with ``-v``, else those that did not pass), its failed cases, its print() output and its
    error; with ``-v`` a FAILURES section; then the separator and the summary lines."""
    dirty = False
    last_file = ""
    for r in results:
        if verbose or not r.passed:
            if last_file and last_file != r.file:
                out.write("\n")
            out.write(f"{r.file}:{r.row}:\n")
            last_file = r.file
            dirty = True
            out.write(r.line() + "\n")
            for depth, sr in walk(r.sub):
                if sr.fail or verbose:
                    out.write(f"  {'  ' * depth}{sr.name}: {'FAIL' if sr.fail else 'PASS'}\n")
            if r.output:
                out.write("\n" + _indent(r.output.strip(), 2) + "\n\n")
        if r.error is not None:
            out.write(f"  {r.error}\n")
    n = counts(results)
    if n["FAIL"] and verbose:
        out.write(f"{RULE}\nFAILURES\n{RULE}\n")
        for r in results:
            if not r.fail:
                continue
            out.write(r.line() + "\n\n")  # OPA prints the evaluation trace here
            if r.sub:
                out.write("\n")
                _lineage(r.sub, [], out)
            out.write("\n")
    if dirty:
        out.write(RULE + "\n")
    total = sum(n.values())
    for status in ("PASS", "FAIL", "SKIPPED", "ERROR"):
        if n[status]:
            out.write(f"{status}: {n[status]}/{total}\n")


def _lineage(subs: dict[str, SubResult], above: list[str], out: TextIO) -> None:
    """Every failed leaf case with the cases above it, one indentation step per level."""
    for key in sorted(subs):
        sr = subs[key]
        if not sr.fail:
            continue
        if sr.sub:
            _lineage(sr.sub, [*above, sr.name], out)
            continue
        for depth, name in enumerate([*above, sr.name]):
            out.write(f"{'  ' * (depth + 1)}{name}: FAIL\n")


_LOCATED = re.compile(r"^(?P<file>[^\s:][^:]*):(?P<row>\d+): (?P<code>[a-z_]+): (?P<msg>.*)$", re.S)


def _error_json(text: str) -> dict[str, Any]:
    m = _LOCATED.match(text)
    if m is None:
        code, _, msg = text.partition(": ")
        if re.fullmatch(r"[a-z_]+", code) and msg:
            return {"code": code, "message": msg}
        return {"message": text}
    return {
        "code": m["code"],
        "message": m["msg"],
        "location": {"file": m["file"], "row": int(m["row"])},
    }


def _sub_json(subs: dict[str, SubResult]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in sorted(subs):
        sr = subs[key]
        entry: dict[str, Any] = {}
        if sr.sub:
            entry["sub_results"] = _sub_json(sr.sub)
        entry["name"] = sr.name
        if sr.fail:
            entry["fail"] = True
        out[key] = entry
    return out


def as_json(results: list[Result], out: TextIO) -> None:
    """``--format json``: the results as an array, fields named and ordered as OPA's."""
    report = []
    for r in results:
        item: dict[str, Any] = {}
        if r.error is not None:
            item["error"] = _error_json(r.error)
        item["location"] = {"file": r.file, "row": r.row, "col": r.col}
        if r.sub:
            item["sub_results"] = _sub_json(r.sub)
        item["package"] = r.package
        item["name"] = r.name
        if r.output:  # Go marshals []byte as base64
            item["output"] = base64.b64encode(r.output.encode()).decode()
        item["duration"] = r.ns
        if r.fail:
            item["fail"] = True
        if r.skip:
            item["skip"] = True
        report.append(item)
    out.write(json.dumps(report, indent=2, ensure_ascii=False) + "\n")


class Coverage:
    """Rows covered by any test, merged over the tests; a row that some test's evaluation
    reported as not covered and no test covered is not covered (OPA's report: rule heads and
    expressions, by row)."""

    def __init__(self) -> None:
        self.covered: dict[str, set[int]] = {}
        self.seen: dict[str, set[int]] = {}

    def add(self, report: dict[str, list[list[int]]]) -> None:
        for path, (covered, not_covered) in report.items():
            self.covered.setdefault(path, set()).update(covered)
            self.seen.setdefault(path, set()).update(covered, not_covered)

    def report(self) -> dict[str, Any]:
        files: dict[str, Any] = {}
        total_covered = total_not = 0
        for path in sorted(self.seen):
            covered = sorted(self.covered.get(path, ()))
            not_covered = sorted(self.seen[path] - set(covered))
            entry: dict[str, Any] = {}
            if covered:
                entry["covered"] = _ranges(covered)
            if not_covered:
                entry["not_covered"] = _ranges(not_covered)
            if covered:
                entry["covered_lines"] = len(covered)
            if not_covered:
                entry["not_covered_lines"] = len(not_covered)
            percent = _percent(len(covered), len(not_covered))
            if percent:
                entry["coverage"] = percent
            files[path] = entry
            total_covered += len(covered)
            total_not += len(not_covered)
        return {
            "files": files,
            "covered_lines": total_covered,
            "not_covered_lines": total_not,
            "coverage": _percent(total_covered, total_not),
        }


def _ranges(rows: list[int]) -> list[dict[str, dict[str, int]]]:
    spans: list[list[int]] = []
    for row in rows:
        if spans and row == spans[-1][1] + 1:
            spans[-1][1] = row
        else:
            spans.append([row, row])
    return [{"start": {"row": a}, "end": {"row": b}} for a, b in spans]


def _percent(covered: int, not_covered: int) -> float | int:
    """100 * covered / all, as Go encodes a float64: 40 stays 40, 2/3 is 66.66666666666667."""
    total = covered + not_covered
    value = 100.0 * covered / total if total else 0.0
    return int(value) if value.is_integer() else value


def threshold_message(report: dict[str, Any], threshold: float, *, verbose: bool) -> str:
    text = (
        f"Code coverage threshold not met: got {report['coverage']:.2f} instead of {threshold:.2f}"
    )
    if verbose and report["files"]:
        text += "\nLines not covered:"
        for path in sorted(report["files"]):
            for span in report["files"][path].get("not_covered", []):
                a, b = span["start"]["row"], span["end"]["row"]
                text += f"\n\t{path}:{a}" if a == b else f"\n\t{path}:{a}-{b}"
    return text
