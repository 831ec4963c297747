"""``legation policy test policies/``: run the Rego unit tests (``test_`` rules) like ``opa test``.

Every ``test_*`` rule of every package is compiled into one regopy bundle and evaluated with an
empty input; a rule that is true passes, false or undefined fails, an evaluation error errors.
Exit status as ``opa test``: 0 all pass, 2 some fail, 1 the policies do not compile.

The tests run in a child process (:mod:`legation.extauthz._probe`): regopy aborts the process on
some programs (``allow with input as {...}`` over rules that use other rules, the usual
``opa test`` style), so a test that kills the child is reported as an ERROR for that test and the
remaining tests run in a fresh child.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import replace
from pathlib import Path

from legation.errors import ConfigError
from legation.extauthz import _probe
from legation.extauthz.policies import Sources, read_sources

_PACKAGE = re.compile(r"^\s*package\s+([A-Za-z_][\w.]*)", re.MULTILINE)
_TEST_RULE = re.compile(r"^\s*(test_\w+)\b", re.MULTILINE)


def discover(src: Sources) -> list[tuple[str, str, str]]:
    """(file, package, rule) for each test rule, in file order."""
    found: list[tuple[str, str, str]] = []
    for path, text in src.modules:
        pkg = _PACKAGE.search(text)
        if pkg is None:
            continue
        for rule in dict.fromkeys(_TEST_RULE.findall(text)):
            found.append((str(path), pkg.group(1), rule))
    return found


def run(directory: Path, *, verbose: bool, out: object = sys.stdout,
        timeout_s: float = 60.0) -> int:
    write = out.write  # type: ignore[attr-defined]
    try:
        src = read_sources(directory)
    except ConfigError as e:
        write(f"1 error occurred: {e}\n")
        return 1
    tests = discover(src)
    results: dict[str, tuple[str, float, str]] = {}  # entry point -> (status, ms, detail)
    everything = list(dict.fromkeys(_entrypoint(pkg, rule) for _, pkg, rule in tests))
    first = _run_group(src, everything, results, timeout_s)
    if first is not None and first.compile_error is not None:
        write(f"1 error occurred: {first.compile_error}\n")
        return 1
    if first is not None:
        # building the bundle crashed the engine: every test file on its own, with the modules
        # that hold no tests, so that only the tests of the file that crashes it error
        base = tuple(m for m in src.modules if not _TEST_RULE.search(m[1]))
        for path, text in src.modules:
            eps = [_entrypoint(pkg, rule) for f, pkg, rule in tests if f == path]
            if not eps:
                continue
            group = replace(src, modules=tuple(sorted({*base, (path, text)})))
            failed_build = _run_group(group, list(dict.fromkeys(eps)), results, timeout_s)
            if failed_build is not None:
                reason = failed_build.compile_error or (
                    failed_build.crash.reason if failed_build.crash else "")
                for ep in eps:
                    results.setdefault(ep, ("ERROR", 0.0, reason))
    passed = failed = errors = 0
    current_file = None
    for file, pkg, rule in tests:
        status, ms, detail = results.get(f"{pkg.replace('.', '/')}/{rule}",
                                         ("ERROR", 0.0, "not evaluated"))
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


def _entrypoint(package: str, rule: str) -> str:
    return f"{package.replace('.', '/')}/{rule}"


def _run_group(src: Sources, entrypoints: list[str],
               results: dict[str, tuple[str, float, str]],
               timeout_s: float) -> _probe.ProbeResult | None:
    """Run ``entrypoints`` in child processes, a fresh child after each one that kills the
    engine (that test errors). Returns the probe result when the bundle itself cannot be built
    (a compile error, or a crash before any test ran), else None."""
    pending = entrypoints
    while pending:
        probe = _probe.run(src, entrypoints=pending, timeout_s=timeout_s)
        if probe.compile_error is not None:
            return probe
        for o in probe.outcomes:
            status = "PASS" if o.ok and o.text == '{"expressions":[true]}' else (
                "FAIL" if o.ok else "ERROR")
            results[o.entrypoint] = (status, o.ms, "" if o.ok else o.text)
        crash = probe.crash
        if crash is None:
            return None
        if crash.entrypoint is None:
            return probe
        results[crash.entrypoint] = ("ERROR", 0.0, crash.reason)
        pending = pending[pending.index(crash.entrypoint) + 1:]
    return None


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
