"""Which parts of the input document a set of Rego modules can read.

The embedded engine is handed the input one node at a time (a few microseconds each), so a whole
opa-envoy-plugin document (~110 nodes, most of them headers and peer addresses) costs more than
evaluating a typical policy. Rego reads the input only through refs rooted at ``input``, so the
refs in the sources bound what any evaluation can see:

* ``input.a.b`` / ``input["a"]["b"]`` / ``import input.a.b`` -> the whole sub-tree at ``a.b``;
  a ref that continues with a variable or a number (``input.a[x]``) keeps the sub-tree at ``a``;
* ``with input... as`` replaces the input, it reads nothing;
* anything else (``input`` as a value: ``f(input)``, ``x := input``, ``some k in input``) means the
  whole document, and :func:`input_paths` returns ``None``.

The projection is conservative by construction: every value a ref can reach is kept whole.

The same scan tells whether a package can reach a nondeterministic builtin (``time.now_ns``,
``http.send``, ``io.jwt.decode_verify``, ...): only a package that cannot is a pure function of its
input, so that its decisions may be cached by input (see :mod:`legation.extauthz.rego`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any

_TOKEN = re.compile(
    r"""
    (?P<comment>\#[^\n]*)
  | (?P<template>\$(?:"(?:[^"\\\n]|\\.)*"|`[^`]*`))
  | (?P<string>"(?:[^"\\\n]|\\.)*")
  | (?P<raw>`[^`]*`)
  | (?P<word>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<space>\s+)
  | (?P<other>.)
""",
    re.VERBOSE | re.DOTALL,
)


def _tokens(source: str) -> list[tuple[str, str]]:
    out = []
    for m in _TOKEN.finditer(source):
        kind = m.lastgroup or "other"
        if kind == "template":
            # $"...{expr}..." evaluates code inside a string: keep a marker (it makes the
            # analysis give up: whole input, no cache) and the code parts, so that a builtin
            # named inside one is still seen
            out.append((kind, m.group()))
            out.extend(_tokens(" ".join(_template_code(m.group()[2:-1]))))
        elif kind != "comment":
            out.append((kind, m.group()))
    return out


def _template_code(body: str) -> list[str]:
    """The ``{...}`` expression parts of a template string's body (``\\{`` is a literal)."""
    parts, depth, start, i = [], 0, 0, 0
    while i < len(body):
        c = body[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            if depth == 0:
                start = i + 1
            depth += 1
        elif c == "}" and depth:
            depth -= 1
            if depth == 0:
                parts.append(body[start:i])
        i += 1
    if depth:  # unbalanced: treat the rest as code, never as text
        parts.append(body[start:])
    return parts


def _ref_path(tokens: list[tuple[str, str]], i: int) -> list[str]:
    """The constant key path that follows ``input`` at tokens[i] (``.a``, ``["a"]``)."""
    path: list[str] = []
    j = i + 1
    while j < len(tokens):
        if tokens[j] == ("other", ".") and j + 1 < len(tokens) and tokens[j + 1][0] == "word":
            path.append(tokens[j + 1][1])
            j += 2
        elif (
            tokens[j] == ("other", "[")
            and j + 2 < len(tokens)
            and tokens[j + 1][0] == "string"
            and tokens[j + 2] == ("other", "]")
        ):
            path.append(json.loads(tokens[j + 1][1]))
            j += 3
        else:
            break
    return path


def _previous(tokens: list[tuple[str, str]], i: int) -> tuple[str, str]:
    j = i - 1
    while j >= 0 and tokens[j][0] == "space":
        j -= 1
    return tokens[j] if j >= 0 else ("space", "")


def _refs(source: str, root: str) -> set[tuple[str, ...]] | None:
    """The constant paths of the refs rooted at ``root`` (``input`` or ``data``); None when the
    root is used as a whole value."""
    tokens = _tokens(source)
    if any(kind == "template" for kind, _ in tokens):
        return None  # a template string can read anything: no projection for this module
    paths: set[tuple[str, ...]] = set()
    for i, (kind, text) in enumerate(tokens):
        if kind != "word" or text != root:
            continue
        if i > 0 and tokens[i - 1] == ("other", "."):
            continue  # a field with that name (data.x.input), not the root
        if root == "input" and _previous(tokens, i) == ("word", "with"):
            continue  # `with input... as v` replaces the input, it does not read it
        path = _ref_path(tokens, i)
        if not path:
            return None
        paths.add(tuple(path))
    return paths


def _tree(paths: set[tuple[str, ...]]) -> dict[str, Any]:
    leaves: set[tuple[str, ...]] = set()
    for path in sorted(paths, key=len):  # a shorter ref keeps everything under it
        if not any(path[:n] in leaves for n in range(1, len(path) + 1)):
            leaves.add(path)
    tree: dict[str, Any] = {}
    for path in leaves:  # no leaf is a prefix of another: inner nodes are never empty
        node = tree
        for key in path:
            node = node.setdefault(key, {})
    return tree


def input_paths(sources: Iterable[str]) -> dict[str, Any] | None:
    """The projection tree (key -> sub-tree, ``{}`` = all of it) the sources can read, or
    ``None`` when some source uses the input as a whole value."""
    paths: set[tuple[str, ...]] = set()
    for source in sources:
        refs = _refs(source, "input")
        if refs is None:
            return None
        paths |= refs
    return _tree(paths)


def input_paths_by_package(
    modules: Iterable[tuple[str, str]],
) -> dict[str, dict[str, Any] | None]:
    """For each package (``a/b``), the projection its rules can read: its own modules and those
    of every package they reach through ``data.`` refs, transitively. ``modules`` are
    (package path, source) pairs."""
    return {package: paths for package, (paths, _) in analyse_packages(modules).items()}


# Builtins whose result is not a function of their arguments (OPA marks them nondeterministic:
# the clock, randomness, the network, the runtime) or that act on the outside (print, trace).
# A package that can reach one of them must be evaluated on every request.
NONDETERMINISTIC = frozenset(
    {
        "time.now_ns",
        "rand.intn",
        "uuid.rfc4122",
        "http.send",
        "net.lookup_ip_addr",
        "opa.runtime",
        "io.jwt.decode_verify",
        "crypto.x509.parse_and_verify_certificates",
        "crypto.x509.parse_and_verify_certificates_with_options",
        "print",
        "trace",
    }
)


TEMPLATE = "$template"  # what nondeterministic_calls reports for a template string


def nondeterministic_calls(source: str) -> set[str]:
    """The :data:`NONDETERMINISTIC` builtins that ``source`` names (outside comments and
    strings), wherever they appear: a call, a ``with ... as`` mock, an argument."""
    tokens = [t for t in _tokens(source) if t[0] != "space"]
    found: set[str] = set()
    if any(kind == "template" for kind, _ in tokens):
        found.add(TEMPLATE)  # evaluated at run time: never cached
    i = 0
    while i < len(tokens):
        if tokens[i][0] != "word" or (i > 0 and tokens[i - 1] == ("other", ".")):
            i += 1
            continue
        name = [tokens[i][1]]
        i += 1
        while i + 1 < len(tokens) and tokens[i] == ("other", ".") and tokens[i + 1][0] == "word":
            name.append(tokens[i + 1][1])
            i += 2
        for n in range(1, len(name) + 1):  # a prefix: `io.jwt.decode_verify(...)` and its ref
            if ".".join(name[:n]) in NONDETERMINISTIC:
                found.add(".".join(name[:n]))
    return found


def analyse_packages(
    modules: Iterable[tuple[str, str]],
) -> dict[str, tuple[dict[str, Any] | None, bool]]:
    """For each package (``a/b``): (the projection its rules can read, whether its result is
    a function of the input and data alone), over its own modules and those of every package
    they reach through ``data.`` refs, transitively."""
    mods = [
        (
            tuple(pkg.split("/")),
            _refs(src, "input"),
            _refs(src, "data"),
            not nondeterministic_calls(src),
        )
        for pkg, src in modules
    ]
    out: dict[str, tuple[dict[str, Any] | None, bool]] = {}
    for package in dict.fromkeys(m[0] for m in mods):
        # what data.<package>.<rule> can be made of: its own modules, and those of packages
        # above it (`package envoy` with `authz.allow if ...`) or below it (`package
        # envoy.authz.allow`): every module whose package overlaps the path
        reached = {i for i, m in enumerate(mods) if _overlap(m[0], package)}
        todo = list(reached)
        while todo:
            data_refs = mods[todo.pop()][2]
            for j, other in enumerate(mods):
                if j in reached:
                    continue
                if data_refs is None or any(_overlap(other[0], r) for r in data_refs):
                    reached.add(j)
                    todo.append(j)
        paths: set[tuple[str, ...]] = set()
        whole = False
        for i in reached:
            refs = mods[i][1]
            if refs is None:
                whole = True
                break
            paths |= refs
        out["/".join(package)] = (None if whole else _tree(paths), all(mods[i][3] for i in reached))
    return out


def _overlap(package: tuple[str, ...], ref: tuple[str, ...]) -> bool:
    """``data.<ref>`` may read rules of ``package`` (one is a prefix of the other)."""
    n = min(len(package), len(ref))
    return package[:n] == ref[:n]
