"""Validating a filter's options with pydantic: errors become ConfigError naming the field."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from legation.errors import ConfigError
from legation.extproc.config import field_path

M = TypeVar("M", bound=BaseModel)


class Options(BaseModel):
    """Base for filter options: immutable, unknown keys rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def validate_options(model: type[M], raw: Mapping[str, Any]) -> M:
    """``model`` from ``raw``; the ConfigError message is ``field: problem`` (the loader prefixes
    the file and the filter's position)."""
    try:
        return model.model_validate(dict(raw))
    except ValidationError as err:
        parts = []
        for e in err.errors():
            where = field_path(tuple(e["loc"])) or "options"
            msg = e["msg"].removeprefix("Value error, ")
            parts.append(f"{where}: {msg}")
        raise ConfigError("; ".join(parts)) from None
