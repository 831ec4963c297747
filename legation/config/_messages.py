"""Pydantic validation errors rewritten as short messages for people editing YAML."""

from __future__ import annotations

import types
from typing import Any, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic_core import ErrorDetails

from legation.config.errors import Problem, path_of

_KIND = {
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "string_type": "a string",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "list_type": "a list",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
}
_BOUND = {
    "greater_than": ">",
    "greater_than_equal": ">=",
    "less_than": "<",
    "less_than_equal": "<=",
}


def problem_of(err: ErrorDetails, root: type[BaseModel]) -> Problem:
    loc = tuple(err["loc"])
    kind, ctx, given = err["type"], err.get("ctx") or {}, err.get("input")
    if kind == "extra_forbidden":
        model = _model_at(root, loc[:-1])
        allowed = f" (allowed: {', '.join(sorted(model.model_fields))})" if model else ""
        return Problem(path_of(loc), f"unknown key{allowed}")
    if kind == "missing":
        return Problem(path_of(loc), "missing required key")
    if kind in _KIND:
        hint = " (quote it in YAML)" if kind == "string_type" and _scalar(given) else ""
        return Problem(path_of(loc), f"expected {_KIND[kind]}, got {_show(given)}{hint}")
    if kind == "literal_error":
        return Problem(path_of(loc), f"expected {ctx.get('expected')}, got {_show(given)}")
    if kind in _BOUND:
        limit = next(iter(ctx.values()), "?")
        if isinstance(limit, float) and limit.is_integer():
            limit = int(limit)
        return Problem(path_of(loc), f"must be {_BOUND[kind]} {limit}, got {_show(given)}")
    if kind in ("too_short", "string_too_short"):
        return Problem(path_of(loc), "must not be empty")
    if kind == "string_too_long":
        return Problem(path_of(loc), f"must be at most {ctx.get('max_length')} characters")
    if kind == "string_pattern_mismatch":
        return Problem(path_of(loc), _pattern_message(str(ctx.get("pattern", "")), given))
    if kind == "value_error":
        return Problem(path_of(loc), str(ctx.get("error", err["msg"])))
    msg = err["msg"]
    return Problem(path_of(loc), msg[:1].lower() + msg[1:])


def _pattern_message(pattern: str, given: Any) -> str:
    if pattern == "^/":
        return f"must start with '/', got {_show(given)}"
    if pattern.startswith("^[a-z0-9]"):
        return (
            f"expected a lower-case name (letters, digits and '-', not at either end), "
            f"got {_show(given)}"
        )
    return f"does not match {pattern}: {_show(given)}"


def _scalar(value: Any) -> bool:
    return isinstance(value, int | float | bool)


def _show(value: Any) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if value is None:
        return "nothing (null)"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _strip_optional(tp: Any) -> Any:
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return _strip_optional(args[0])
    return tp


def _model_at(root: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The model class found by following ``loc`` from ``root`` (None if it leads elsewhere)."""
    tp: Any = root
    for part in loc:
        tp = _strip_optional(tp)
        if isinstance(part, int):
            tp = get_args(tp)[0] if get_origin(tp) is list else None
        elif isinstance(tp, type) and issubclass(tp, BaseModel):
            field = tp.model_fields.get(part)
            tp = field.annotation if field else None
        elif get_origin(tp) is dict:
            tp = get_args(tp)[1]
        else:
            tp = None
        if tp is None:
            return None
    tp = _strip_optional(tp)
    return tp if isinstance(tp, type) and issubclass(tp, BaseModel) else None
