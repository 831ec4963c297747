"""Small value types shared by the mesh model: names, ports, durations, percentages.

Durations are written the way Envoy and Istio users write them (``250ms``, ``2s``, ``1m``) or as a
plain number of seconds, and are held as :class:`datetime.timedelta`.
"""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Annotated, Any

from pydantic import BeforeValidator, ConfigDict, Field, PlainSerializer

#: Every model rejects unknown keys (a misspelt key is an error, not a default) and is frozen.
STRICT = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)

_NAME_RE = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}

#: A DNS-label-like name (lower case, digits, dashes): safe in Envoy resource and stat names.
Name = Annotated[str, Field(pattern=_NAME_RE, max_length=63)]
Port = Annotated[int, Field(ge=1, le=65535)]
Percent = Annotated[float, Field(ge=0, le=100)]
HttpStatus = Annotated[int, Field(ge=200, le=599)]


def _parse_duration(value: Any) -> Any:
    if isinstance(value, timedelta):
        return value
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 250ms, 2s or 1m")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        m = _DURATION_RE.match(value)
        if m is None:
            raise ValueError(f"invalid duration {value!r}: use e.g. 250ms, 2s or 1m")
        seconds = float(m.group(1)) * _UNITS[m.group(2)]
    else:
        raise ValueError("expected a duration such as 250ms, 2s or 1m")
    if seconds <= 0:
        raise ValueError("a duration must be positive")
    return timedelta(seconds=seconds)


def _format_duration(value: timedelta) -> str:
    ms = round(value.total_seconds() * 1000)
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


#: A positive duration: ``250ms``, ``2s``, ``1.5s``, ``1m``, ``1h`` or a number of seconds.
Duration = Annotated[
    timedelta, BeforeValidator(_parse_duration), PlainSerializer(_format_duration, return_type=str)
]
