"""Rego sources on disk -> one compiled regopy bundle, and the hot reload that swaps it.

A directory of ``*.rego`` modules (and ``data.json`` base documents) is compiled once per version
into a :class:`regopy.Bundle` with one entry point per package and decision rule
(``envoy/authz/allow``); evaluating a compiled entry point costs ~76 us, a fresh query ~10x more.

The running :class:`CompiledPolicies` is an immutable reference that :class:`PolicyStore` swaps.
A directory that fails to compile never replaces it: the error is logged and counted. Before a
version is compiled in this process it is compiled and evaluated once in a child process
(:mod:`legation.extauthz._probe`): a policy that crashes the engine or hangs is refused like one
that does not compile, so it can never take the service down.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from regopy import Bundle, Interpreter, RegoError

from legation.errors import ConfigError
from legation.extauthz import _probe
from legation.extauthz._inputrefs import analyse_packages

log = logging.getLogger("legation.extauthz.policies")

_PACKAGE = re.compile(r"^\s*package\s+([A-Za-z_][\w.]*)", re.MULTILINE)
_TEST_RULE = re.compile(r"^\s*(test_\w+)\b", re.MULTILINE)


@dataclass(frozen=True)
class Sources:
    """The policy files of one directory, read once: what is compiled is what was probed."""

    directory: str
    modules: tuple[tuple[str, str], ...]  # (path, text), sorted by path
    data: tuple[tuple[str, str], ...]  # data.json documents: (path, text)

    def to_json(self) -> dict[str, Any]:
        return {"directory": self.directory, "modules": self.modules, "data": self.data}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Sources:
        return cls(directory=raw["directory"],
                   modules=tuple((p, t) for p, t in raw["modules"]),
                   data=tuple((p, t) for p, t in raw["data"]))


@dataclass(frozen=True)
class CompiledPolicies:
    version: str
    bundle: Bundle
    entrypoints: frozenset[str]
    packages: frozenset[str]
    files: tuple[str, ...]
    # per package path (envoy/authz): the input parts its rules can read; None: everything
    input_paths: Mapping[str, dict[str, Any] | None] = field(default_factory=dict)
    package_files: Mapping[str, str] = field(default_factory=dict)  # package path -> file
    # per package path: no nondeterministic builtin (time.now_ns, http.send, ...) is reachable,
    # so equal inputs give equal results and a decision may be cached for this version
    deterministic: Mapping[str, bool] = field(default_factory=dict)


def is_test_file(path: Path) -> bool:
    """``*_test.rego``: where `opa test` suites live by convention."""
    return path.name.endswith("_test.rego")


def sources(directory: Path, *, tests: bool = True) -> list[Path]:
    return sorted(
        p for p in directory.rglob("*.rego") if p.is_file() and (tests or not is_test_file(p))
    )


def read_sources(directory: Path, *, tests: bool = True) -> Sources:
    """The modules under ``directory``; ``tests=False`` leaves out ``*_test.rego`` files."""
    files = sources(directory, tests=tests)
    if not files:
        raise ConfigError(f"{directory}: no .rego files", code="policy_compile_failed")
    try:
        modules = tuple((str(p), p.read_text()) for p in files)
        data = tuple((str(p), p.read_text()) for p in sorted(directory.rglob("data.json")))
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{directory}: cannot read: {e}", code="policy_compile_failed") from None
    return Sources(directory=str(directory), modules=modules, data=data)


def fingerprint(directory: Path) -> str:
    """Changes whenever a policy or data file is added, removed or rewritten."""
    h = hashlib.sha256()
    for p in sorted([*directory.rglob("*.rego"), *directory.rglob("data.json")]):
        try:
            st = p.stat()
        except OSError:
            continue
        h.update(f"{p}\0{st.st_mtime_ns}\0{st.st_size}\n".encode())
    return h.hexdigest()


def compile_dir(directory: Path, *, rules: Iterable[str], tests: bool = False) -> CompiledPolicies:
    """Compile every module under ``directory``; raises ConfigError naming the file on failure."""
    return compile_sources(read_sources(directory), rules=rules, tests=tests)


def compile_sources(src: Sources, *, rules: Iterable[str], tests: bool = False,
                    entrypoints: Iterable[str] = ()) -> CompiledPolicies:
    """Compile ``src`` with an entry point per package and rule (and test rule, with
    ``tests``), plus the explicit ``entrypoints``."""
    interp = Interpreter()
    packages: set[str] = set()
    entrypoints = set(entrypoints)
    package_files: dict[str, str] = {}
    digest = hashlib.sha256()
    rules = tuple(rules)
    for path, text in src.modules:
        digest.update(text.encode())
        rel = str(Path(path).relative_to(src.directory))
        try:
            interp.add_module(rel, text)
        except RegoError as e:
            raise ConfigError(f"{path}: {_first_line(e)}", code="policy_compile_failed") from None
        pkg = _PACKAGE.search(text)
        if pkg is None:
            raise ConfigError(f"{path}: no package declaration", code="policy_compile_failed")
        prefix = pkg.group(1).replace(".", "/")
        packages.add(pkg.group(1))
        package_files.setdefault(prefix, path)
        entrypoints.update(f"{prefix}/{rule}" for rule in rules)
        if tests:
            entrypoints.update(f"{prefix}/{t}" for t in _TEST_RULE.findall(text))
    for path, text in src.data:
        digest.update(text.encode())
        try:
            interp.add_data_json(text)
        except (RegoError, ValueError) as e:
            raise ConfigError(f"{path}: {_first_line(e)}", code="policy_compile_failed") from None
    try:
        bundle = interp.build(None, sorted(entrypoints))
    except RegoError as e:
        raise ConfigError(f"{src.directory}: {_first_line(e)}",
                          code="policy_compile_failed") from None
    if not bundle.ok():
        raise ConfigError(f"{src.directory}: policies did not compile",
                          code="policy_compile_failed")
    analysis = analyse_packages((_package_path(t), t) for _, t in src.modules)
    return CompiledPolicies(
        version=digest.hexdigest()[:12],
        bundle=bundle,
        entrypoints=frozenset(entrypoints),
        packages=frozenset(packages),
        files=tuple(path for path, _ in src.modules),
        input_paths={pkg: paths for pkg, (paths, _) in analysis.items()},
        package_files=package_files,
        deterministic={pkg: det for pkg, (_, det) in analysis.items()},
    )


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    msg = re.search(r"errormsg \d+:([^)\n]*)", text)
    where = re.search(r"\(error \d+:([^|\s]+)", text)
    if msg:
        return f"{msg.group(1).strip()}" + (f" (in {where.group(1)})" if where else "")
    return text.splitlines()[0] if text else type(e).__name__


def probe(src: Sources, *, rules: Iterable[str], timeout_s: float) -> None:
    """Compile and evaluate every entry point of ``src`` once in a child process (with a
    representative request and an empty input); raises ConfigError naming the file when the
    child crashes, hangs or cannot compile."""
    result = _probe.run(src, rules=tuple(rules), inputs=(_probe.representative_input(), {}),
                        timeout_s=timeout_s)
    if result.compile_error is not None:
        raise ConfigError(result.compile_error, code="policy_compile_failed")
    crash = result.crash
    if crash is None:
        return
    rules = tuple(rules)
    where = src.directory
    if crash.entrypoint is not None:
        package = crash.entrypoint.rsplit("/", 1)[0]
        where = next((path for path, text in src.modules if _package_path(text) == package),
                     where)
    else:  # building the bundle crashed: find the module that does it on its own
        for path, text in src.modules[:_MAX_BISECT]:
            package = _package_path(text)
            alone = replace(src, modules=((path, text),), data=())
            if _probe.run(alone, entrypoints=[f"{package}/{r}" for r in rules],
                          timeout_s=timeout_s).crash is not None:
                where = path
                break
    what = f"evaluating {crash.entrypoint}" if crash.entrypoint else "compiling"
    raise ConfigError(f"{where}: {what}: {crash.reason}", code="policy_crashed")


_MAX_BISECT = 32  # modules tried one by one to name the one that crashes the build


def _package_path(text: str) -> str:
    m = _PACKAGE.search(text)
    return m.group(1).replace(".", "/") if m else ""


def load(
    directory: Path, *, rules: Iterable[str], probe_timeout_s: float, tests: bool = False
) -> CompiledPolicies:
    """Read, probe in a child process, then compile here. Blocking.

    Test files are left out unless ``tests``: the service never evaluates them, and regopy 1.5
    crashes while building a bundle that holds an `opa test`-style ``with input as`` over a rule
    that uses other rules, which would refuse a whole directory of otherwise good policies."""
    src = read_sources(directory, tests=tests)
    rules = tuple(rules)
    probe(src, rules=rules, timeout_s=probe_timeout_s)
    return compile_sources(src, rules=rules)


class PolicyStore:
    """Holds the running compiled policies and swaps them when the directory changes."""

    def __init__(self, directory: Path, *, rules: Iterable[str], interval_s: float,
                 probe_timeout_s: float = 10.0, tests: bool = False) -> None:
        self.directory = directory
        self.tests = tests
        self.rules = tuple(rules)
        self.interval_s = interval_s
        self.probe_timeout_s = probe_timeout_s
        self.failed_reloads = 0
        self.last_error: str | None = None
        self._fingerprint = fingerprint(directory)
        # fails at start with a ConfigError, crashing policies included
        self.current = load(directory, rules=self.rules, probe_timeout_s=probe_timeout_s,
                            tests=tests)
        self._task: asyncio.Task[None] | None = None

    async def reload(self) -> bool:
        """Recompile if the directory changed; True when a new version was swapped in."""
        fp = fingerprint(self.directory)
        if fp == self._fingerprint:
            return False
        self._fingerprint = fp
        try:
            compiled = await asyncio.to_thread(load, self.directory, rules=self.rules,
                                               probe_timeout_s=self.probe_timeout_s,
                                               tests=self.tests)
        except ConfigError as e:
            self.failed_reloads += 1
            self.last_error = str(e)
            log.error("policy reload failed, keeping version %s: %s", self.current.version, e)
            return False
        if compiled.version != self.current.version:
            log.info("policies reloaded: %s -> %s", self.current.version, compiled.version)
        self.current = compiled
        self.last_error = None
        return True

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.reload()
            except Exception:  # a watcher must survive anything the filesystem does
                log.exception("policy watcher error")

    def start(self) -> None:
        if self._task is None and self.interval_s > 0:
            self._task = asyncio.get_running_loop().create_task(self._watch())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

