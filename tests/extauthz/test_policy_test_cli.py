"""``legation policy test`` against `opa test`'s behaviour, one table row per behaviour.

Each case names what it mirrors in OPA: its ``tester`` package (``runner.go``: which rules are
tests, how a result is judged, duplicate names, parameterized cases, ``todo_`` skips, the
per-test timeout; ``reporter.go``: the pretty, JSON and coverage reporters), ``cmd/test.go`` (flags
and exit codes), ``cover/cover.go`` (the coverage report) and the policy-testing docs (``with``
mocking of input, data, rules, builtins and functions). The Rego is our own.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from legation.extauthz import policy_test
from legation.extauthz._test_report import go_duration
from legation.extauthz.policy_test import Options

STATUSES = """package statuses
import rego.v1

test_true if true
test_false if false
test_undefined if input.nothing == 1
test_number := 7
test_division_error if 1 / 0 == 1
todo_test_not_yet if false
"""

PARAMETERIZED = """package params
import rego.v1

pairs := [
	{"note": "small", "n": 1, "double": 2},
	{"note": "large", "n": 50, "double": 100},
	{"note": "wrong", "n": 3, "double": 7},
]

test_double[tc.note] if {
	some tc in pairs
	tc.n * 2 == tc.double
}

test_nested[group][tc.note] if {
	some group in ["left", "right"]
	some tc in pairs
	tc.n < 10
}
"""

ALL_CASES_PASS = """package params_ok
import rego.v1

test_upper[word] if {
	some word in ["a", "b"]
	upper(word) != word
}
"""

DUPLICATES = """package dup
import rego.v1

test_same if true
test_same if false
test_same if 1 == 1
"""

SET_TEST = """package sets
import rego.v1

test_collect contains x if some x in [1, 2]
"""

POLICY = """package shop.authz
import rego.v1

default allow := false

allow if input.user in data.shop.staff

allow if {
	input.user == "guest"
	data.settings.open
}

late if time.now_ns() > cutoff

cutoff := 1000

greeting(name) := concat(" ", ["hello", name])

greets if greeting(input.user) == "hello bob"
"""

MOCKING = """package shop.authz_test
import rego.v1

import data.shop.authz

test_input_replaced if authz.allow with input as {"user": "alice"}

test_data_replaced if {
	authz.allow with input as {"user": "zed"} with data.shop.staff as ["zed"]
}

test_rule_replaced if authz.allow with authz.allow as true

test_builtin_replaced if not authz.late with time.now_ns as 5

fixed(_) := "hello bob"

test_function_replaced if authz.greets with authz.greeting as fixed with input.user as "x"

test_function_by_value if authz.greets with authz.greeting as "hello bob" with input.user as "y"

test_yaml_data if authz.allow with input as {"user": "guest"}
"""

PRINTS = """package prints
import rego.v1

test_says if {
	print("checking", 42)
	true
}
"""

RUNAWAY = """package spin
import rego.v1

test_quick if true

test_spin if {
	every a in numbers.range(1, 20000) {
		every b in numbers.range(1, 20000) {
			a + b > 0
		}
	}
}

test_after if true
"""

COVERED = """package cov
import rego.v1

allow if {
	input.user == "alice"
}

deny if {
	input.user == "mallory"
}
"""

COVERED_TEST = """package cov_test
import rego.v1

import data.cov

test_allow if cov.allow with input as {"user": "alice"}
"""


@dataclass
class Case:
    mirrors: str
    files: dict[str, str]
    options: Options = field(default_factory=Options)
    exit: int = 0
    out: list[str] = field(default_factory=list)  # lines expected in stdout, in this order
    absent: list[str] = field(default_factory=list)
    err: list[str] = field(default_factory=list)


CASES: dict[str, Case] = {
    "statuses": Case(
        "runner.go runTest: true passes; false, undefined and non-true values fail; an eval "
        "error errors; todo_test_ is SKIPPED without running. reporter.go: counts, summary",
        {"statuses_test.rego": STATUSES},
        exit=2,
        out=[
            "{d}/statuses_test.rego:5:",
            "data.statuses.test_false: FAIL (T)",
            "{d}/statuses_test.rego:6:",
            "data.statuses.test_undefined: FAIL (T)",
            "data.statuses.test_number: FAIL (T)",
            "data.statuses.test_division_error: ERROR (T)",
            "  {d}/statuses_test.rego:8: eval_builtin_error: div: divide by zero",
            "data.statuses.todo_test_not_yet: SKIPPED",
            "-" * 80,
            "PASS: 1/6",
            "FAIL: 3/6",
            "SKIPPED: 1/6",
            "ERROR: 1/6",
        ],
        absent=["test_true"],
    ),
    "verbose lists passing tests": Case(
        "reporter.go PrettyReporter: -v prints every result, each after its file:row line",
        {"statuses_test.rego": STATUSES},
        Options(verbose=True),
        exit=2,
        out=[
            "{d}/statuses_test.rego:4:",
            "data.statuses.test_true: PASS (T)",
            "data.statuses.test_false: FAIL (T)",
            "FAILURES",
            "data.statuses.test_false: FAIL (T)",
            "PASS: 1/6",
        ],
    ),
    "skipped with -z exits 0": Case(
        "cmd/test.go --exit-zero-on-skipped: a skipped test alone does not make the status 2",
        {"t.rego": "package t\nimport rego.v1\ntest_a if true\ntodo_test_b if false\n"},
        Options(exit_zero_on_skipped=True),
        exit=0,
        out=["data.t.todo_test_b: SKIPPED", "PASS: 1/2", "SKIPPED: 1/2"],
    ),
    "skipped without -z exits 2": Case(
        "cmd/test.go runTests: any result that is not PASS (a skip too) is exit status 2",
        {"t.rego": "package t\nimport rego.v1\ntest_a if true\ntodo_test_b if false\n"},
        exit=2,
        out=["SKIPPED: 1/2"],
    ),
    "all pass is quiet": Case(
        "reporter.go: without -v nothing but the summary when all pass (no separator)",
        {"t.rego": "package t\nimport rego.v1\ntest_a if true\ntest_b if 2 > 1\n"},
        exit=0,
        out=["PASS: 2/2"],
        absent=["-" * 80, "test_a"],
    ),
    "parameterized cases": Case(
        "runner.go subResults + injectTestCaseFunc: one sub-result per key of test_x[k]; a case "
        "whose body failed after binding its key is a FAIL; leaves are counted",
        {"params_test.rego": PARAMETERIZED},
        Options(verbose=True),
        exit=2,
        out=[
            "data.params.test_double: FAIL (T)",
            "  large: PASS",
            "  small: PASS",
            "  wrong: FAIL",
            "data.params.test_nested: FAIL (T)",
            "  left: FAIL",
            "    large: FAIL",
            "    small: PASS",
            "    wrong: PASS",
            "  right: FAIL",
            "PASS: 6/9",
            "FAIL: 3/9",
        ],
    ),
    "parameterized all pass": Case(
        "runner.go subResults: every case true is a pass, each case counted",
        {"p.rego": ALL_CASES_PASS},
        exit=0,
        out=["PASS: 2/2"],
    ),
    "duplicate names": Case(
        "runner.go rewriteDuplicateTestNames: each body of a test name is its own test, the "
        "second and later named test_x#01, #02",
        {"dup_test.rego": DUPLICATES},
        Options(verbose=True),
        exit=2,
        out=[
            "data.dup.test_same: PASS (T)",
            "data.dup.test_same#01: FAIL (T)",
            "data.dup.test_same#02: PASS (T)",
            "PASS: 2/3",
            "FAIL: 1/3",
        ],
    ),
    "partial set test fails": Case(
        "runner.go runTest: a multi-value (contains) test's value is a set, not true: FAIL",
        {"s.rego": SET_TEST},
        exit=2,
        out=["data.sets.test_collect: FAIL (T)"],
    ),
    "with mocking": Case(
        "policy-testing docs, Data and Function Mocking: with on input, data, rules, "
        "builtins and functions (by function and by value); YAML data beside the policies",
        {
            "shop/authz.rego": POLICY,
            "shop/authz_test.rego": MOCKING,
            "shop/data.json": '{"staff": ["alice"]}',
            "settings/data.yaml": "open: true\n",
        },
        Options(verbose=True),
        exit=0,
        out=[
            "data.shop.authz_test.test_input_replaced: PASS (T)",
            "data.shop.authz_test.test_data_replaced: PASS (T)",
            "data.shop.authz_test.test_rule_replaced: PASS (T)",
            "data.shop.authz_test.test_builtin_replaced: PASS (T)",
            "data.shop.authz_test.test_function_replaced: PASS (T)",
            "data.shop.authz_test.test_function_by_value: PASS (T)",
            "data.shop.authz_test.test_yaml_data: PASS (T)",
            "PASS: 7/7",
        ],
    ),
    "print output": Case(
        "reporter.go: a reported test's print() output, indented between blank lines",
        {"p.rego": PRINTS},
        Options(verbose=True),
        exit=0,
        out=["data.prints.test_says: PASS (T)", "", "  checking 42", "", "-" * 80],
    ),
    "run filter": Case(
        "cmd/test.go --run/-r: only tests whose data.pkg.name matches the regex run",
        {"statuses_test.rego": STATUSES},
        Options(verbose=True, run=r"test_(true|false)$"),
        exit=2,
        out=[
            "data.statuses.test_true: PASS (T)",
            "data.statuses.test_false: FAIL (T)",
            "PASS: 1/2",
            "FAIL: 1/2",
        ],
        absent=["test_number", "todo_"],
    ),
    "no tests": Case(
        "reporter.go: no results print nothing; exit 0",
        {"t.rego": "package t\nallow := true\n"},
        exit=0,
        absent=["PASS", "-" * 80],
    ),
    "no tests with --fail-on-empty": Case(
        "cmd/test.go --fail-on-empty: exit 1 and 'no tests were run'",
        {"t.rego": "package t\nallow := true\n"},
        Options(fail_on_empty=True),
        exit=1,
        err=["no tests were run"],
    ),
    "parse error": Case(
        "cmd/test.go: policies that do not load are exit status 1, the error on stderr",
        {"bad.rego": "package bad\ntest_x if { 1 == }\n"},
        exit=1,
        err=["bad.rego:2"],
    ),
    "bad regex": Case(
        "runner.go setupTestRun: an invalid --run regex is an error, exit 1",
        {"t.rego": "package t\nimport rego.v1\ntest_a if true\n"},
        Options(run="(unclosed"),
        exit=1,
        err=["error parsing regexp"],
    ),
    "runaway test": Case(
        "runner.go runTests: each test has its own timeout; a test past it errors and the "
        "others still run",
        {"spin_test.rego": RUNAWAY},
        Options(verbose=True, timeout_s=0.5),
        exit=2,
        out=[
            "data.spin.test_quick: PASS (T)",
            "data.spin.test_spin: ERROR (T)",
            "  eval_cancel_error: timed out after 0.5 s",
            "data.spin.test_after: PASS (T)",
            "PASS: 2/3",
            "ERROR: 1/3",
        ],
    ),
    "coverage threshold not met": Case(
        "reporter.go JSONCoverageReporter + cover.CoverageThresholdError: exit 2, the message "
        "and (-v) the lines not covered",
        {"cov.rego": COVERED, "cov_test.rego": COVERED_TEST},
        Options(threshold=90, verbose=True),
        exit=2,
        err=[
            "Code coverage threshold not met: got 60.00 instead of 90.00",
            "Lines not covered:",
            "\t{d}/cov.rego:8-9",
        ],
    ),
    "coverage with a failure": Case(
        "reporter.go JSONCoverageReporter: a failing test reports failures, no coverage, exit 1",
        {"cov.rego": COVERED, "cov_test.rego": COVERED_TEST + "test_no if cov.deny\n"},
        Options(coverage=True),
        exit=1,
        out=["data.cov_test.test_no: FAIL (T)"],
        err=["data.cov_test.test_no: FAIL (T)"],
        absent=['"files"'],
    ),
    "threshold out of range": Case(
        "cmd/test.go isThresholdValid: the threshold must be within 0..100, exit 1",
        {"t.rego": "package t\n"},
        Options(threshold=101),
        exit=1,
        err=["Code coverage threshold must be between 0 and 100"],
    ),
}


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def _normalize(text: str, root: Path) -> list[str]:
    text = text.replace(str(root), "{d}")
    return re.sub(r"\((?:\d+(?:\.\d+)?(?:ns|µs|ms|s|m|h))+\)", "(T)", text).split("\n")


def _in_order(expected: list[str], lines: list[str]) -> None:
    at = 0
    for want in expected:
        try:
            at = lines.index(want, at) + 1
        except ValueError:
            raise AssertionError(f"{want!r} not found in order in:\n" + "\n".join(lines)) from None


@pytest.mark.parametrize("name", list(CASES))
def test_like_opa_test(name: str, tmp_path: Path) -> None:
    case = CASES[name]
    _write(tmp_path, case.files)
    out, err = io.StringIO(), io.StringIO()
    status = policy_test.run_paths([tmp_path], case.options, out=out, err=err)
    lines, errors = _normalize(out.getvalue(), tmp_path), _normalize(err.getvalue(), tmp_path)
    assert status == case.exit, (case.mirrors, out.getvalue(), err.getvalue())
    _in_order(case.out, lines)
    for want in case.err:
        assert any(want in line for line in errors), (want, err.getvalue())
    for unwanted in case.absent:
        assert unwanted not in out.getvalue(), (unwanted, out.getvalue())


def test_exact_pretty_output_without_verbose(tmp_path: Path) -> None:
    """reporter.go PrettyReporter: the whole text for failures in two files, a blank line
    between files, the separator, then the counts."""
    _write(
        tmp_path,
        {
            "a_test.rego": "package a\nimport rego.v1\ntest_ok if true\ntest_no if false\n",
            "b_test.rego": "package b\nimport rego.v1\n\ntest_no if false\n",
        },
    )
    out = io.StringIO()
    assert policy_test.run_paths([tmp_path], Options(), out=out, err=io.StringIO()) == 2
    assert _normalize(out.getvalue(), tmp_path) == [
        "{d}/a_test.rego:4:",
        "data.a.test_no: FAIL (T)",
        "",
        "{d}/b_test.rego:4:",
        "data.b.test_no: FAIL (T)",
        "-" * 80,
        "PASS: 1/3",
        "FAIL: 2/3",
        "",
    ]


def test_coverage_report_for_a_known_policy(tmp_path: Path) -> None:
    """cover.go Report: rows of rule heads and expressions, covered if any test evaluated
    them, merged over all tests; ranges of consecutive rows; percentages as Go encodes them."""
    _write(
        tmp_path,
        {
            "cov.rego": COVERED,
            "cov_test.rego": COVERED_TEST
            + 'test_deny if cov.deny with input as {"user": "mallory"}\n'
            + 'test_allow_other if not cov.allow with input as {"user": "x"}\n',
        },
    )
    out = io.StringIO()
    assert (
        policy_test.run_paths([tmp_path], Options(coverage=True), out=out, err=io.StringIO()) == 0
    )
    document = json.loads(out.getvalue())
    assert document == {
        "files": {
            f"{tmp_path}/cov.rego": {
                "covered": [
                    {"start": {"row": 4}, "end": {"row": 5}},
                    {"start": {"row": 8}, "end": {"row": 9}},
                ],
                "covered_lines": 4,
                "coverage": 100,
            },
            f"{tmp_path}/cov_test.rego": {
                "covered": [{"start": {"row": 6}, "end": {"row": 8}}],
                "covered_lines": 3,
                "coverage": 100,
            },
        },
        "covered_lines": 7,
        "not_covered_lines": 0,
        "coverage": 100,
    }
    out = io.StringIO()
    _write(tmp_path, {"cov_test.rego": COVERED_TEST})
    assert (
        policy_test.run_paths([tmp_path], Options(coverage=True), out=out, err=io.StringIO()) == 0
    )
    document = json.loads(out.getvalue())
    assert document["files"][f"{tmp_path}/cov.rego"] == {
        "covered": [{"start": {"row": 4}, "end": {"row": 5}}],
        "not_covered": [{"start": {"row": 8}, "end": {"row": 9}}],
        "covered_lines": 2,
        "not_covered_lines": 2,
        "coverage": 50,
    }
    assert (document["covered_lines"], document["not_covered_lines"]) == (3, 2)
    assert document["coverage"] == 60


def test_json_format(tmp_path: Path) -> None:
    """reporter.go JSONReporter: an array of results with location, package, name, duration
    (ns), fail/skip only when set, sub_results by case, print output as base64 bytes."""
    _write(
        tmp_path,
        {
            "statuses_test.rego": STATUSES,
            "params_test.rego": ALL_CASES_PASS,
            "prints_test.rego": PRINTS,
        },
    )
    out = io.StringIO()
    assert (
        policy_test.run_paths([tmp_path], Options(format="json"), out=out, err=io.StringIO()) == 2
    )
    results = {f"{r['package']}.{r['name']}": r for r in json.loads(out.getvalue())}
    assert results["data.statuses.test_true"]["location"] == {
        "file": f"{tmp_path}/statuses_test.rego",
        "row": 4,
        "col": 1,
    }
    assert "fail" not in results["data.statuses.test_true"]
    assert isinstance(results["data.statuses.test_true"]["duration"], int)
    assert results["data.statuses.test_false"]["fail"] is True
    assert results["data.statuses.todo_test_not_yet"]["skip"] is True
    assert results["data.statuses.test_division_error"]["error"]["code"] == "eval_builtin_error"
    assert results["data.params_ok.test_upper"]["sub_results"] == {
        "a": {"name": "a"},
        "b": {"name": "b"},
    }
    assert results["data.prints.test_says"]["output"] == "Y2hlY2tpbmcgNDIK"  # "checking 42\n"


@pytest.mark.parametrize(
    ("ns", "text"),
    [
        (0, "0s"),
        (850, "850ns"),
        (1_500, "1.5µs"),
        (2_250_000, "2.25ms"),
        (3_000_000_000, "3s"),
        (90_500_000_000, "1m30.5s"),
        (3_600_000_000_000, "1h0m0s"),
    ],
)
def test_durations_print_as_go_does(ns: int, text: str) -> None:
    """reporter.go prints a result's time.Duration with Go's String()."""
    assert go_duration(ns) == text


def test_cli_passes_flags_through(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """cmd/test.go flags via `legation policy test`: -v, --run, --timeout in Go's syntax."""
    from legation.cli import main as cli_main

    _write(tmp_path, {"statuses_test.rego": STATUSES})
    status = cli_main(["policy", "test", "-v", "-r", "test_true", "--timeout", "2s", str(tmp_path)])
    assert status == 0
    assert "data.statuses.test_true: PASS" in capsys.readouterr().out
