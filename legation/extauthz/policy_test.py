"""``legation policy test policies/``: run the Rego unit tests (``test_`` rules) like ``opa test``.

Every module (``*_test.rego`` included) is loaded into OPA's engine in an evaluator process
(:mod:`legation.extauthz.evaluator`) and every ``test_*`` rule of every package is evaluated with
an empty input: true passes, false or undefined fails, an evaluation error errors. Each test has a
deadline (``timeout_s``): a test that runs past it is killed with its process and errors, and the
remaining tests run in a fresh one. Exit status as ``opa test``: 0 all pass, 2 some fail, 1 the
policies do not load.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
import time
from pathlib import Path

from legation.errors import ConfigError
from legation.extauthz.evaluator import EvaluationError, EvaluatorPool, parse_result
from legation.extauthz.policies import Sources, package_of, read_sources

_TEST_RULE = re.compile(r"^\s*(test_\w+)\b", re.MULTILINE)


def discover(src: Sources) -> list[tuple[str, str, str]]:
    """(file, package, rule) for each test rule, in file order."""
    found: list[tuple[str, str, str]] = []
    for path, text in src.modules:
        package = package_of(path, text)
        for rule in dict.fromkeys(_TEST_RULE.findall(text)):
            found.append((str(path), package, rule))
    return found


async def _evaluate_all(src: Sources, names: list[str], timeout_s: float,
                        ) -> dict[str, tuple[str, float, str]]:
    """data path -> (PASS|FAIL|ERROR, ms, detail); raises ConfigError if loading fails."""
    pool = await EvaluatorPool(src.modules, src.data, size=1).start()
    results: dict[str, tuple[str, float, str]] = {}
    try:
        for name in names:
            started = time.perf_counter()
            try:
                async with asyncio.timeout(timeout_s):
                    kind, text = await pool.evaluate(name, b"{}")
            except TimeoutError:
                results[name] = ("ERROR", timeout_s * 1000, f"timed out after {timeout_s:g} s")
                continue
            except EvaluationError as e:
                results[name] = ("ERROR", (time.perf_counter() - started) * 1000, str(e))
                continue
            ms = (time.perf_counter() - started) * 1000
            passed = kind == "v" and parse_result(text) is True
            results[name] = ("PASS" if passed else "FAIL", ms, "")
    finally:
        await pool.close()
    return results


def run(directory: Path, *, verbose: bool, out: object = sys.stdout,
        timeout_s: float = 60.0) -> int:
    write = out.write  # type: ignore[attr-defined]
    try:
        src = read_sources(directory)
        tests = discover(src)
        names = list(dict.fromkeys(f"{pkg}.{rule}" for _, pkg, rule in tests))
        results = asyncio.run(_evaluate_all(src, names, timeout_s))
    except ConfigError as e:
        write(f"1 error occurred: {e}\n")
        return 1
    passed = failed = errors = 0
    current_file = None
    for file, pkg, rule in tests:
        status, ms, detail = results.get(f"{pkg}.{rule}", ("ERROR", 0.0, "not evaluated"))
        passed += status == "PASS"
        failed += status == "FAIL"
        errors += status == "ERROR"
        if verbose or status != "PASS":
            if file != current_file:
                write(f"{file}:\n")
                current_file = file
            write(f"data.{pkg}.{rule}: {status} ({ms:.3f}ms)\n")
            if detail:
                write(f"  {detail.strip().splitlines()[0][:300]}\n")
    total = passed + failed + errors
    if total == 0:
        write("no tests found\n")
        return 0
    if verbose or failed or errors:
        write("-" * 80 + "\n")
    if passed:
        write(f"PASS: {passed}/{total}\n")
    if failed:
        write(f"FAIL: {failed}/{total}\n")
    if errors:
        write(f"ERROR: {errors}/{total}\n")
    return 0 if failed == errors == 0 else 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="legation policy test",
                                     description="Run the Rego unit tests (test_ rules).")
    parser.add_argument("paths", nargs="*", default=["policies"], type=Path)
    parser.add_argument("-v", "--verbose", action="store_true", help="list every test")
    args = parser.parse_args(argv)
    status = 0
    for path in args.paths:
        if not path.is_dir():
            print(f"{path}: not a directory", file=sys.stderr)
            return 1
        status = max(status, run(path, verbose=args.verbose))
    return status


if __name__ == "__main__":
    raise SystemExit(main())
