"""YAML scalars read the way envoyproxy/ratelimit (Go, yaml.v2, YAML 1.1) reads them.

Legation parses with PyYAML, which agrees with yaml.v2 on nearly everything. Where they part, an
upstream config would load with another meaning, so the differences are bridged here:

* a string field (``domain``, ``key``, ``value``, ``name``, ``unit``) given an unquoted ``true``,
  ``yes``, ``10`` or ``0x1F``: yaml.v2 stores the text *as written* (``value: yes`` matches the
  request value ``yes``), PyYAML would construct ``True`` or ``31``. :func:`load` keeps the text;
* a boolean field given an unquoted ``y``/``n``: a boolean in yaml.v2, a string in PyYAML.

:func:`load` parses with the bounded loader of :mod:`legation._yaml` (sizes, aliases, depth, and
its error messages), and parses a second time with :class:`_AsWritten` only when the first result
holds such a scalar, which configs rarely do.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import yaml

from legation import _yaml

TEXT_FIELDS = frozenset({"domain", "key", "value", "name", "unit"})
BOOL_FIELDS = frozenset(
    {
        "shadow_mode",
        "quota_mode",
        "detailed_metric",
        "value_to_metric",
        "share_threshold",
        "unlimited",
    }
)
_TAGS_AS_TEXT = frozenset({"tag:yaml.org,2002:bool", "tag:yaml.org,2002:int"})
_YAML11_BOOLS = {"y": True, "Y": True, "n": False, "N": False}


class _AsWritten(_yaml.SafeLoader):
    """Keeps bool/int scalars of string fields as their text; reads y/n in boolean fields."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        mapping: dict[Any, Any] = super().construct_mapping(node, deep=deep)
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or not isinstance(
                value_node, yaml.ScalarNode
            ):
                continue
            field = key_node.value
            if field in TEXT_FIELDS and value_node.tag in _TAGS_AS_TEXT:
                mapping[field] = value_node.value
            elif (
                field in BOOL_FIELDS
                and value_node.style is None
                and value_node.value in _YAML11_BOOLS
            ):
                mapping[field] = _YAML11_BOOLS[value_node.value]
        return mapping


def load(text: str, *, source: str) -> Any:
    raw = _yaml.load(text, source=source)  # bounded; errors name the source
    if _needs_second_pass(raw):
        try:
            raw = yaml.load(text, Loader=_AsWritten)  # the same text parsed once already
        except yaml.YAMLError:  # pragma: no cover - cannot fail where the first pass did not
            pass
    return raw


def _needs_second_pass(raw: Any) -> bool:
    stack: list[Any] = [raw]
    budget = _yaml.MAX_NODES
    while stack and budget > 0:
        node = stack.pop()
        budget -= 1
        if isinstance(node, dict):
            for field, value in node.items():
                if field == "metadata":
                    continue  # free-form: typed values stay typed
                if field in TEXT_FIELDS and isinstance(value, bool | int):
                    return True
                if field in BOOL_FIELDS and isinstance(value, str) and value in _YAML11_BOOLS:
                    return True
                if isinstance(value, dict | list):
                    stack.append(value)
        elif isinstance(node, list):
            stack.extend(_containers(node))
    return False


def _containers(items: Iterable[Any]) -> list[Any]:
    return [item for item in items if isinstance(item, dict | list)]


def wildcard_parts(pattern: str) -> tuple[str, ...]:
    """``"foo*bar*"`` -> ``("foo", "bar", "")``: literal segments around each ``*``."""
    return tuple(pattern.split("*"))


def wildcard_match(parts: tuple[str, ...], value: str) -> bool:
    """Each ``*`` matches zero or more characters; segments must appear in order, the first at
    the start and the last at the end. Linear in ``len(value)`` per segment, no regex."""
    if len(parts) == 1:
        return parts[0] == value
    first, last = parts[0], parts[-1]
    if len(value) < sum(map(len, parts)):
        return False
    if not value.startswith(first) or not value.endswith(last):
        return False
    at, end = len(first), len(value) - len(last)
    for middle in parts[1:-1]:
        found = value.find(middle, at, end)
        if found < 0:
            return False
        at = found + len(middle)
    return True
