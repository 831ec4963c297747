"""``legation policy test policies/``: run the Rego unit tests (``test_`` rules) like ``opa test``.

Every ``test_*`` rule of every package is compiled into one regopy bundle and evaluated with an
empty input; a rule that is true passes, false or undefined fails, an evaluation error errors.
Exit status as ``opa test``: 0 all pass, 2 some fail, 1 the policies do not compile.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

from regopy import Input, Interpreter, RegoError

from legation.errors import ConfigError
from legation.extauthz.policies import compile_dir, sources

_PACKAGE = re.compile(r"^\s*package\s+([A-Za-z_][\w.]*)", re.MULTILINE)
_TEST_RULE = re.compile(r"^\s*(test_\w+)\b", re.MULTILINE)


def discover(directory: Path) -> list[tuple[str, str, str]]:
    """(file, package, rule) for each test rule, in file order."""
    found: list[tuple[str, str, str]] = []
    for path in sources(directory):
        text = path.read_text()
        pkg = _PACKAGE.search(text)
        if pkg is None:
            continue
        for rule in dict.fromkeys(_TEST_RULE.findall(text)):
            found.append((str(path), pkg.group(1), rule))
    return found


def run(directory: Path, *, verbose: bool, out: object = sys.stdout) -> int:
    write = out.write  # type: ignore[attr-defined]
    try:
        compiled = compile_dir(directory, rules=(), tests=True)
    except ConfigError as e:
        write(f"1 error occurred: {e}\n")
        return 1
    tests = discover(directory)
    passed = failed = errors = 0
    current_file = None
    for file, pkg, rule in tests:
        interp = Interpreter()
        interp.set_input(Input({}))
        started = time.perf_counter()
        try:
            output = interp.query_bundle_entrypoint(compiled.bundle,
                                                    f"{pkg.replace('.', '/')}/{rule}")
            text = str(output)
            status = "PASS" if output.ok() and text == '{"expressions":[true]}' else (
                "FAIL" if output.ok() else "ERROR")
        except RegoError:
            status = "ERROR"
        elapsed = (time.perf_counter() - started) * 1000
        passed += status == "PASS"
        failed += status == "FAIL"
        errors += status == "ERROR"
        if verbose or status != "PASS":
            if file != current_file:
                write(f"{file}:\n")
                current_file = file
            write(f"data.{pkg}.{rule}: {status} ({elapsed:.3f}ms)\n")
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
