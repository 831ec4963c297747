"""``headers``: add, set, remove and rename headers on requests and responses.

```yaml
- name: headers
  options:
    request:  {set: {x-env: prod}, add: {via: legation}, remove: [x-debug], rename: {x-old: x-new}}
    response: {remove: [server], set: {cache-control: no-store}}
```

Operations run in the order rename, remove, set, add. Only the sides that have operations are
declared as phases, so a request-only configuration costs one round trip per request.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import Field, field_validator

from legation.errors import ConfigError
from legation.extproc.exchange import Exchange
from legation.extproc.filters._options import Options, validate_options
from legation.extproc.sdk import Filter, Phase

_PSEUDO_OK = {":path"}


def _check_name(name: str) -> str:
    lowered = name.lower()
    if not lowered or (lowered.startswith(":") and lowered not in _PSEUDO_OK) or lowered == "host":
        raise ValueError(f"header {name!r} cannot be changed by this filter")
    if any(c.isspace() for c in lowered):
        raise ValueError(f"header name {name!r} contains whitespace")
    return lowered


class HeaderOps(Options):
    set: dict[str, str] = Field(default_factory=dict)
    add: dict[str, str] = Field(default_factory=dict)
    remove: tuple[str, ...] = ()
    rename: dict[str, str] = Field(default_factory=dict)

    @field_validator("set", "add")
    @classmethod
    def _names(cls, value: dict[str, str]) -> dict[str, str]:
        return {_check_name(k): v for k, v in value.items()}

    @field_validator("remove")
    @classmethod
    def _removed(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(_check_name(k) for k in value)

    @field_validator("rename")
    @classmethod
    def _renamed(cls, value: dict[str, str]) -> dict[str, str]:
        return {_check_name(k): _check_name(v) for k, v in value.items()}

    def empty(self) -> bool:
        return not (self.set or self.add or self.remove or self.rename)

    def apply(self, ex: Exchange) -> None:
        for old, new in self.rename.items():
            ex.rename_header(old, new)
        for name in self.remove:
            ex.remove_header(name)
        for name, value in self.set.items():
            ex.set_header(name, value)
        for name, value in self.add.items():
            ex.add_header(name, value)


class HeadersOptions(Options):
    request: HeaderOps = Field(default_factory=HeaderOps)
    response: HeaderOps = Field(default_factory=HeaderOps)


class Headers(Filter):
    name = "headers"
    inline = True  # plain, non-blocking hooks bounded by the message: no thread hop
    stateless = True  # each hook edits its own message's headers only

    def __init__(self, options: HeadersOptions) -> None:
        self.options = options
        phases = set()
        if not options.request.empty():
            phases.add(Phase.REQUEST_HEADERS)
        if not options.response.empty():
            phases.add(Phase.RESPONSE_HEADERS)
        self.phases = frozenset(phases)

    def on_request_headers(self, ex: Exchange) -> None:
        self.options.request.apply(ex)

    def on_response_headers(self, ex: Exchange) -> None:
        self.options.response.apply(ex)


class HeadersFactory:
    name = "headers"

    def validate(self, raw: Mapping[str, Any]) -> HeadersOptions:
        options = validate_options(HeadersOptions, raw)
        if options.request.empty() and options.response.empty():
            raise ConfigError("needs at least one of request, response operations")
        return options

    def create(self, config: HeadersOptions) -> Headers:
        return Headers(config)
