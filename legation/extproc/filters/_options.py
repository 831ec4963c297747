"""Validating a filter's options with pydantic: errors become ConfigError naming the field."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from legation.extproc.config import OptionsError, pydantic_problems

M = TypeVar("M", bound=BaseModel)


class Options(BaseModel):
    """Base for filter options: immutable, unknown keys rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def validate_options(model: type[M], raw: Mapping[str, Any]) -> M:
    """``model`` from ``raw``; raises OptionsError listing each bad field (the loader prefixes
    the file and the filter's position)."""
    try:
        return model.model_validate(dict(raw))
    except ValidationError as err:
        raise OptionsError(pydantic_problems(err)) from None
