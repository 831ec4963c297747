"""The one YAML loader every Legation config file goes through: safe, and bounded.

``yaml.safe_load`` constructs only plain types, but it still expands aliases without bound: ten
nested anchors of ten aliases each (the "billion laughs") are a few hundred bytes that become 10^9
nodes for whoever walks the result (pydantic, a JSON dump, a path resolver), and ``&a [*a]`` is a
list that contains itself. So, before anything is constructed, the composed node graph is checked:

* its size *with every alias expanded* is at most :data:`MAX_NODES` (a large mesh is a few
  thousand nodes); anchors and aliases stay usable within that;
* an alias may not refer to a node that contains it (recursive structures are refused);
* nesting is at most :data:`MAX_DEPTH` levels;
* the text is at most :data:`MAX_BYTES` (checked before parsing, and before reading a file).

Anything PyYAML raises while parsing or constructing (syntax errors, an impossible date such as
``2001-02-30``, an unhashable key) becomes a :class:`YamlError`: a :class:`ConfigError` whose
message starts with the source (the file) and says where (line, column) when it is known.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from legation.errors import ConfigError

MAX_BYTES = 2 * 1024 * 1024
MAX_NODES = 250_000
MAX_DEPTH = 64


class YamlError(ConfigError):
    """A document that could not be (or may not be) loaded. ``reason`` is the message without the
    source, e.g. ``invalid YAML at line 3, column 1: ...``; ``line`` is 1-based, or None."""

    code = "invalid_yaml"

    def __init__(
        self, source: str, reason: str, *, line: int | None = None, code: str | None = None
    ) -> None:
        super().__init__(f"{source}: {reason}", code=code)
        self.source = source
        self.reason = reason
        self.line = line


class _Refused(yaml.MarkedYAMLError):
    """Raised inside the loader for a document over a bound (carries the mark)."""

    def __init__(self, problem: str, mark: yaml.Mark | None, code: str) -> None:
        super().__init__(problem=problem, problem_mark=mark)
        self.code = code


class SafeLoader(yaml.SafeLoader):  # type: ignore[misc]
    """``yaml.SafeLoader`` that checks each composed document against the bounds above."""

    def compose_document(self) -> yaml.Node:
        node: yaml.Node = super().compose_document()
        check_graph(node)
        return node


class UniqueKeySafeLoader(SafeLoader):
    """:class:`SafeLoader` that also rejects a key given twice in one mapping (PyYAML keeps the
    last one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r}", key_node.start_mark
                    )
                seen.add(key)
            except TypeError:
                continue  # unhashable: the base class reports it
        mapping: dict[Any, Any] = super().construct_mapping(node, deep=deep)
        return mapping


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def check_graph(root: yaml.Node, *, max_nodes: int = MAX_NODES, max_depth: int = MAX_DEPTH) -> None:
    """Refuse a node graph whose alias-expanded size, depth or shape is over the bounds.

    Iterative post-order walk over *distinct* nodes with the expanded size of each memoised, so
    the check itself costs O(distinct nodes) however large the expansion would be."""
    size: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        if done:
            on_path.discard(key)
            total = 1 + sum(size[id(c)] for c in _children(node))
            if total > max_nodes:
                raise _Refused(
                    f"the document expands to more than {max_nodes} nodes "
                    "(YAML aliases repeating large anchors?)",
                    node.start_mark,
                    "yaml_too_large",
                )
            size[key] = total
            continue
        if key in size:
            continue
        if key in on_path:
            raise _Refused(
                "a YAML alias refers to a node that contains it (recursive)",
                node.start_mark,
                "yaml_recursive",
            )
        on_path.add(key)
        if len(on_path) > max_depth:
            raise _Refused(
                f"nested more than {max_depth} levels deep", node.start_mark, "yaml_too_deep"
            )
        stack.append((node, True))
        for child in _children(node):
            if id(child) in on_path:
                raise _Refused(
                    "a YAML alias refers to a node that contains it (recursive)",
                    child.start_mark,
                    "yaml_recursive",
                )
            if id(child) not in size:
                stack.append((child, False))


def load(text: str | bytes, *, source: str, unique_keys: bool = False) -> Any:
    """Parse one YAML document; raise :class:`YamlError` naming ``source``."""
    if len(text) > MAX_BYTES:
        raise YamlError(
            source, f"the document is larger than {MAX_BYTES} bytes", code="yaml_too_large"
        )
    loader = UniqueKeySafeLoader if unique_keys else SafeLoader
    try:
        return yaml.load(text, Loader=loader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        what = exc.problem or exc.context or "unparsable"
        code = getattr(exc, "code", None)
        if mark is None:
            raise YamlError(source, f"invalid YAML: {what}", code=code) from None
        where = f"line {mark.line + 1}, column {mark.column + 1}"
        reason = f"{what} (at {where})" if code else f"invalid YAML at {where}: {what}"
        raise YamlError(source, reason, line=mark.line + 1, code=code) from None
    except yaml.YAMLError as exc:
        raise YamlError(source, f"invalid YAML: {exc}") from None
    except RecursionError:
        raise YamlError(
            source, f"nested more than {MAX_DEPTH} levels deep", code="yaml_too_deep"
        ) from None
    except (ValueError, TypeError, OverflowError) as exc:  # e.g. a date such as 2001-02-30
        raise YamlError(source, f"invalid YAML: {exc}") from None


def read_bytes(path: str | os.PathLike[str]) -> bytes:
    """The file's bytes, refusing one larger than :data:`MAX_BYTES` before reading it all.
    Raises OSError when it cannot be read, :class:`YamlError` when it is too large."""
    with open(path, "rb") as f:
        data = f.read(MAX_BYTES + 1)
    if len(data) > MAX_BYTES:
        raise YamlError(
            os.fspath(path), f"the file is larger than {MAX_BYTES} bytes", code="yaml_too_large"
        )
    return data


def read_text(path: str | os.PathLike[str]) -> str:
    """:func:`read_bytes` decoded as UTF-8 (a decoding error is a :class:`YamlError`)."""
    data = read_bytes(path)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise YamlError(
            os.fspath(path), f"not UTF-8 text (byte {exc.start})", code="invalid_yaml"
        ) from None


def load_file(path: str | Path, *, unique_keys: bool = False) -> Any:
    """Read (bounded) and :func:`load` the file at ``path``. Raises OSError when it cannot be
    read (callers word that themselves) and :class:`YamlError` for everything else."""
    return load(read_text(path), source=os.fspath(path), unique_keys=unique_keys)
