"""A policy directory read into one version: its modules and data documents, what each package
reads, and the check that it loads (in an evaluator process). :mod:`legation.extauthz.policies`
swaps versions."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from legation import _yaml
from legation.errors import ConfigError
from legation.extauthz import evaluator
from legation.extauthz._inputrefs import analyse_packages, nondeterministic_calls

_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
# the whole declaration line: `package a.b`, `package a["b"].c`, then only a comment
_PACKAGE_LINE = re.compile(
    rf'package\s+(?P<ref>{_IDENT}(?:\s*\.\s*{_IDENT}|\s*\[\s*"{_IDENT}"\s*\])*)\s*(?:#.*)?'
)
_PART = re.compile(rf"{_IDENT}")


def package_of(path: str, text: str) -> str:
    """The module's package, dotted (``envoy.authz``). The declaration is the first line that is
    not blank or a comment; one this cannot read completely (``package a["b.c"]``) is refused
    rather than guessed, since the analysis of what a package reads depends on it."""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        m = _PACKAGE_LINE.fullmatch(stripped)
        if m is None:
            raise ConfigError(
                f"{path}: the first statement must be a package declaration of "
                'plain names (package a.b or a["b"])',
                code="policy_compile_failed",
            )
        return ".".join(_PART.findall(m.group("ref")))
    raise ConfigError(f"{path}: no package declaration", code="policy_compile_failed")


_TEST_RULE = re.compile(r"^\s*(test_\w+)\b", re.MULTILINE)


@dataclass(frozen=True)
class Sources:
    """The policy files of one directory, read once: what is compiled is what was probed."""

    directory: str
    modules: tuple[tuple[str, str], ...]  # (path, text), sorted by path
    # data documents: (path, JSON text, where under ``data`` it goes: the directory's parts)
    data: tuple[tuple[str, str, tuple[str, ...]], ...]

    def to_json(self) -> dict[str, Any]:
        return {"directory": self.directory, "modules": self.modules, "data": self.data}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Sources:
        return cls(
            directory=raw["directory"],
            modules=tuple((p, t) for p, t in raw["modules"]),
            data=tuple((p, t, tuple(at)) for p, t, at in raw["data"]),
        )


@dataclass(frozen=True)
class CompiledPolicies:
    version: str
    sources: Sources
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
        data = tuple(_data_document(directory, p) for p in data_files(directory))
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{directory}: cannot read: {e}", code="policy_compile_failed") from None
    return Sources(directory=str(directory), modules=modules, data=data)


_DATA_NAMES = ("data.json", "data.yaml", "data.yml")


def data_files(directory: Path) -> list[Path]:
    return sorted(p for name in _DATA_NAMES for p in directory.rglob(name) if p.is_file())


def _data_document(directory: Path, path: Path) -> tuple[str, str, tuple[str, ...]]:
    """(path, the document as JSON text, its place under ``data``). YAML goes through the
    project's bounded loader; JSON is checked by the engine's loader in the evaluator."""
    at = path.parent.relative_to(directory).parts
    if path.suffix == ".json":
        return str(path), path.read_text(), at
    value = _yaml.load_file(path)
    return str(path), json.dumps(value if value is not None else {}), at


def fingerprint(directory: Path) -> str:
    """Changes whenever a policy or data file is added, removed or rewritten."""
    h = hashlib.sha256()
    for p in sorted([*directory.rglob("*.rego"), *data_files(directory)]):
        try:
            st = p.stat()
        except OSError:
            continue
        h.update(f"{p}\0{st.st_mtime_ns}\0{st.st_size}\n".encode())
    return h.hexdigest()


#: Builtins that reach the network from the evaluator. Off unless the check allows them:
#: a policy is data-plane code, and a request must not be able to steer it into a network call.
NETWORK_BUILTINS = frozenset({"http.send", "net.lookup_ip_addr"})


def refuse_network(src: Sources) -> None:
    """Raise ConfigError naming the file and line of the first network builtin a module names."""
    for path, text in src.modules:
        found = nondeterministic_calls(text) & NETWORK_BUILTINS
        if not found:
            continue
        name = sorted(found)[0]
        line = next(
            (n for n, ln in enumerate(text.splitlines(), 1) if name in ln.split("#", 1)[0]), 1
        )
        raise ConfigError(
            f"{path}:{line}: {name} reaches the network and is disabled for this "
            "check (set its option allow_network: true to allow it)",
            code="policy_compile_failed",
        )


def analyse(src: Sources, *, rules: Iterable[str], tests: bool = False) -> CompiledPolicies:
    """The version's entry points (``package/path/rule`` for each package and rule, and each
    test rule with ``tests``) and what each package reads; no engine involved."""
    packages: set[str] = set()
    entrypoints: set[str] = set()
    package_files: dict[str, str] = {}
    digest = hashlib.sha256()
    rules = tuple(rules)
    for path, text in src.modules:
        digest.update(path.encode() + b"\0" + text.encode() + b"\0")
        package = package_of(path, text)
        prefix = package.replace(".", "/")
        packages.add(package)
        package_files.setdefault(prefix, path)
        entrypoints.update(f"{prefix}/{rule}" for rule in rules)
        if tests:
            entrypoints.update(f"{prefix}/{t}" for t in _TEST_RULE.findall(text))
    for path, text, _ in src.data:
        digest.update(path.encode() + b"\0" + text.encode() + b"\0")
    analysis = analyse_packages((package_of(p, t).replace(".", "/"), t) for p, t in src.modules)
    return CompiledPolicies(
        version=digest.hexdigest()[:12],
        sources=src,
        entrypoints=frozenset(entrypoints),
        packages=frozenset(packages),
        files=tuple(path for path, _ in src.modules),
        input_paths={pkg: paths for pkg, (paths, _) in analysis.items()},
        package_files=package_files,
        deterministic={pkg: det for pkg, (_, det) in analysis.items()},
    )


def load(
    directory: Path,
    *,
    rules: Iterable[str],
    probe_timeout_s: float,
    tests: bool = False,
    allow_network: bool = False,
) -> CompiledPolicies:
    """Read and validate in an evaluator process (blocking). Raises ConfigError naming the file.

    Test files are left out unless ``tests``: the service never evaluates them."""
    src = read_sources(directory, tests=tests)
    compiled = analyse(src, rules=rules, tests=tests)
    if not allow_network:
        refuse_network(src)
    evaluator.validate(src.modules, src.data, timeout_s=probe_timeout_s)
    return compiled
