"""Load a mesh: read the file, parse YAML, check the schema, then check the meaning.

Two passes, as envoyproxy/ratelimit does: the schema pass (pydantic, unknown keys rejected) must
succeed before the semantic pass (:mod:`legation.config.checks`) runs on a typed model. Either pass
reports every problem it finds, one per line, each naming the file and the field path.
"""

from __future__ import annotations

import os
from typing import Any

from pydantic import ValidationError

from legation import _yaml
from legation.config import _messages
from legation.config.checks import semantic_problems
from legation.config.errors import TOP, MeshConfigError, Problem
from legation.config.model import Mesh


def load_mesh(path: str | os.PathLike[str]) -> Mesh:
    """Read and validate ``path``; raise :class:`MeshConfigError` (a ``ConfigError``)."""
    source = os.fspath(path)
    try:
        text = _yaml.read_text(path)
    except _yaml.YamlError as exc:
        raise MeshConfigError(
            source, [Problem(TOP, exc.reason)], code="unreadable_config"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise MeshConfigError(
            source, [Problem(TOP, f"cannot read the file: {reason}")], code="unreadable_config"
        ) from None
    return parse_mesh(text, source=source)


def parse_mesh(text: str, *, source: str) -> Mesh:
    """Validate mesh YAML ``text``; ``source`` names it in error messages (usually the path)."""
    raw = _parse_yaml(text, source)
    if raw is None:
        raise MeshConfigError(source, [Problem(TOP, "the file is empty; expected a mapping")])
    if not isinstance(raw, dict):
        kind = type(raw).__name__
        raise MeshConfigError(source, [Problem(TOP, f"expected a mapping, got a {kind}")])
    try:
        mesh = Mesh.model_validate(raw)
    except ValidationError as exc:
        problems = [_messages.problem_of(err, Mesh) for err in exc.errors()]
        raise MeshConfigError(source, problems) from None
    problems = semantic_problems(mesh)
    if problems:
        raise MeshConfigError(source, problems)
    return mesh


def _parse_yaml(text: str, source: str) -> Any:
    try:
        return _yaml.load(text, source=source, unique_keys=True)
    except _yaml.YamlError as exc:
        raise MeshConfigError(
            source, [Problem(TOP, exc.reason)], code="unreadable_config"
        ) from None
