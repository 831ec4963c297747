"""The config package's error: a :class:`~legation.errors.ConfigError` carrying every problem found.

Each problem is one line of the message, ``<file>: <field path>: <what is wrong>``, so that the
first line reads like the interface promises and the rest can be listed by ``legation check``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from legation.errors import ConfigError

TOP = "(top level)"


@dataclass(frozen=True, slots=True)
class Problem:
    path: str  # e.g. ``routes[0].to.service``; :data:`TOP` for the document itself
    message: str

    def render(self, source: str) -> str:
        return f"{source}: {self.path}: {self.message}"


class MeshConfigError(ConfigError):
    """A mesh file failed validation. ``problems`` lists them all, in document order."""

    def __init__(self, source: str, problems: Sequence[Problem], *, code: str | None = None):
        self.source = source
        self.problems = tuple(problems)
        super().__init__("\n".join(p.render(source) for p in self.problems), code=code)


def path_of(loc: Iterable[str | int]) -> str:
    """``("routes", 0, "to", "service")`` -> ``routes[0].to.service``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or TOP
