"""``legation policy test policies/``: run the Rego unit tests like ``opa test``.

Every module (``*_test.rego`` included) and every ``data.json``/``data.yaml`` (at its directory's
path) is loaded into OPA's engine in an evaluator process (:mod:`legation.extauthz.evaluator`),
and each test rule is evaluated on its own with an empty input, as OPA's tester does:

* a test rule is one whose name (the head's ground prefix) has a term starting ``test_``, found
  by OPA's parser; ``todo_test_*`` rules are reported SKIPPED without running; every rule body
  is its own test: a second ``test_x`` in the same package is ``test_x#01``, and so on;
* true passes; false, undefined or any other value fails; an evaluation error errors;
* a parameterized test (``test_x[note] if { some note, tc in cases ... }``) reports one case per
  key: ``true`` passes, anything else fails, and a case whose body bound the key but then
  failed (so the key is missing from the result) fails too;
* each test has a deadline (``--timeout``, 5 s as OPA's): one that runs past it is killed with
  its process and errors, and the rest run in a fresh process.

Output, ``-v``, ``--format json``, ``--coverage``/``--threshold``, ``-r``, ``-z`` and the exit
status (0 all pass, 2 some did not, 1 the policies do not load) follow `opa test`; see
:mod:`legation.extauthz._test_report`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from legation.errors import ConfigError
from legation.extauthz import _test_report as report
from legation.extauthz._test_rules import TestRule, discover, judge
from legation.extauthz.evaluator import EvaluationError, EvaluatorPool
from legation.extauthz.policies import Sources, read_sources

__all__ = ["Options", "TestRule", "discover", "judge", "main", "run", "run_paths"]


async def _run(
    modules: tuple[tuple[str, str], ...],
    data: Any,
    rules: list[TestRule],
    *,
    timeout_s: float,
    coverage: report.Coverage | None,
) -> list[report.Result]:
    pool = await EvaluatorPool(modules, data, size=1).start()
    results: list[report.Result] = []
    try:
        for rule in rules:
            if rule.skip:
                results.append(
                    report.Result(
                        file=rule.file,
                        row=rule.row,
                        col=rule.col,
                        package=rule.package,
                        name=rule.name,
                        skip=True,
                    )
                )
                continue
            spec: dict[str, Any] = {"path": rule.query, "coverage": coverage is not None}
            if rule.key:
                spec["cases"] = {"at": f"{rule.file}:{rule.row}", "key": list(rule.key)}
            try:
                answer = await pool.run_test(spec, timeout_s=timeout_s)
            except TimeoutError:
                answer = {
                    "error": f"eval_cancel_error: timed out after {timeout_s:g} s",
                    "ns": int(timeout_s * 1e9),
                }
            except EvaluationError as e:
                answer = {"error": str(e)}
            if coverage is not None and "coverage" in answer:
                coverage.add(answer["coverage"])
            results.append(judge(rule, answer))
    finally:
        await pool.close()
    return results


def _load(paths: list[Path]) -> Sources:
    """All the paths as one set of sources, as `opa test a/ b/` loads them together."""
    modules: list[tuple[str, str]] = []
    data: list[tuple[str, str, tuple[str, ...]]] = []
    for path in paths:
        if path.is_file() and path.suffix == ".rego":
            modules.append((str(path), path.read_text()))
            continue
        if not path.is_dir():
            raise ConfigError(f"{path}: no such file or directory", code="policy_compile_failed")
        src = read_sources(path)
        modules.extend(src.modules)
        data.extend(src.data)
    return Sources(directory=",".join(map(str, paths)), modules=tuple(modules), data=tuple(data))


@dataclass(frozen=True)
class Options:
    verbose: bool = False
    format: str = "pretty"
    coverage: bool = False
    threshold: float = 0.0
    run: str | None = None
    exit_zero_on_skipped: bool = False
    fail_on_empty: bool = False
    timeout_s: float = 5.0


def run_paths(
    paths: list[Path], options: Options, *, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    if not 0 <= options.threshold <= 100:
        err.write("Code coverage threshold must be between 0 and 100\n")
        return 1
    try:
        pattern = re.compile(options.run) if options.run else None
    except re.error as e:
        err.write(f"error parsing regexp: {e}: `{options.run}`\n")
        return 1
    coverage = report.Coverage() if options.coverage or options.threshold > 0 else None
    try:
        src = _load(paths)
        rules, modules = discover(src.modules)
        if pattern is not None:
            rules = [r for r in rules if pattern.search(f"{r.package}.{r.name}")]
        results = asyncio.run(
            _run(modules, src.data, rules, timeout_s=options.timeout_s, coverage=coverage)
        )
    except (ConfigError, OSError, TimeoutError) as e:
        err.write(f"{e}\n")
        return 1
    status = 0
    for r in results:
        if not r.passed and not (r.skip and options.exit_zero_on_skipped):
            status = 2
    if coverage is not None:
        return _report_coverage(results, coverage, options, status, out=out, err=err)
    if options.format == "json":
        report.as_json(results, out)
    else:
        report.pretty(results, out, verbose=options.verbose)
    if not results and options.fail_on_empty:
        err.write("no tests were run\n")
        return 1
    return status


def _report_coverage(
    results: list[report.Result],
    coverage: report.Coverage,
    options: Options,
    status: int,
    *,
    out: TextIO,
    err: TextIO,
) -> int:
    """`opa test --coverage`: an error or a failure ends the run (exit 1) without a report; a
    report under ``--threshold`` is exit 2; otherwise the report as JSON."""
    for r in results:
        if r.error is not None:
            err.write(f"{r.error}\n")
            return 1
    failures = [r for r in results if r.fail]
    if failures:
        report.pretty(failures, out, verbose=options.verbose)
        first = failures[0]
        err.write(
            first.line()
            + "\n"
            + "".join(
                f"{'  ' * (d + 1)}{sr.name}: {'FAIL' if sr.fail else 'PASS'}\n"
                for d, sr in report.walk(first.sub)
            )
            + "\n"
        )
        return 1
    document = coverage.report()
    if document["coverage"] < options.threshold:
        err.write(
            report.threshold_message(document, options.threshold, verbose=options.verbose) + "\n"
        )
        return 2
    out.write(json.dumps(document, indent=2, ensure_ascii=False) + "\n")
    return status


def run(
    directory: Path,
    *,
    verbose: bool,
    out: TextIO | None = None,
    timeout_s: float = 5.0,
    err: TextIO | None = None,
) -> int:
    """One directory, pretty output (what ``legation policy test DIR [-v]`` does); errors
    go to ``err``, by default to ``out`` too."""
    return run_paths(
        [directory],
        Options(verbose=verbose, timeout_s=timeout_s),
        out=out,
        err=err if err is not None else out,
    )


def _duration(text: str) -> float:
    """``--timeout``: Go's duration syntax (``5s``, ``500ms``, ``1m30s``) or plain seconds."""
    units = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
    try:
        return float(text)
    except ValueError:
        pass
    parts = re.findall(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)", text)
    if not parts or "".join(a + b for a, b in parts) != text:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}")
    return sum(float(a) * units[b] for a, b in parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="legation policy test",
        description="Run the Rego unit tests (test_ rules) like `opa test`.",
    )
    parser.add_argument(
        "paths",
        nargs="*",
        default=["policies"],
        type=Path,
        help="directories (their .rego and data.json/data.yaml) or .rego files",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="list every test")
    parser.add_argument("-f", "--format", choices=("pretty", "json"), default="pretty")
    parser.add_argument(
        "-c",
        "--coverage",
        action="store_true",
        help="report coverage as JSON instead of the test results",
    )
    parser.add_argument(
        "--threshold",
        type=float,
        default=0.0,
        help="exit 2 if coverage (percent) is under this; implies --coverage",
    )
    parser.add_argument("-r", "--run", help="run only tests whose name matches this regex")
    parser.add_argument(
        "-z",
        "--exit-zero-on-skipped",
        action="store_true",
        help="skipped (todo_) tests do not make the exit status 2",
    )
    parser.add_argument("--fail-on-empty", action="store_true", help="exit 1 when no test was run")
    parser.add_argument(
        "--timeout",
        type=_duration,
        default=5.0,
        help="each test's deadline (5s, 500ms, or seconds; default 5s)",
    )
    args = parser.parse_args(argv)
    options = Options(
        verbose=args.verbose,
        format=args.format,
        coverage=args.coverage,
        threshold=args.threshold,
        run=args.run,
        exit_zero_on_skipped=args.exit_zero_on_skipped,
        fail_on_empty=args.fail_on_empty,
        timeout_s=args.timeout,
    )
    return run_paths(list(args.paths), options)


if __name__ == "__main__":
    raise SystemExit(main())
