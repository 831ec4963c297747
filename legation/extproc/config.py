"""The routes' filter chains: a small YAML file, validated completely when it is loaded.

```yaml
default_chain: web          # optional: streams that name no chain use it
chains:
  web:
    fail_open: false        # on a filter error: 500 (default) or pass the request through
    filters:
      - name: request_id
      - name: header_route
        options: {header: x-cohort, rules: [...]}
```

A route names its chain in the ``x-legation-chain`` gRPC initial metadata that Envoy sends when it
opens the stream (see :func:`legation.extproc.envoy_filter.per_route`). Unknown keys are errors;
every message starts with the file and the field (``chains.web.filters[1].options.rules[0]``).
Each filter's options are validated by its plugin factory before any filter is created, so a bad
option fails at load, never on a request.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from legation import _yaml, plugins
from legation.errors import ConfigError
from legation.extproc.chain import Chain

CHAIN_METADATA_KEY = "x-legation-chain"


class OptionsError(ConfigError):
    """A filter's options are invalid; ``problems`` are (field path within options, message)."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        super().__init__(_join("options", problems))
        self.problems = problems


class _FilterSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(min_length=1)
    options: dict[str, Any] = Field(default_factory=dict)


class _ChainSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    fail_open: bool = False
    message_timeout: float | None = Field(default=None, gt=0)
    filters: list[_FilterSpec] = Field(default_factory=list)


class _FileSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    default_chain: str | None = None
    chains: dict[str, _ChainSpec] = Field(default_factory=dict)


@dataclass(frozen=True)
class Chains:
    """Every chain by name, and the one used when a stream names none."""

    chains: Mapping[str, Chain]
    default: str | None = None

    def get(self, name: str | None) -> Chain | None:
        return self.chains.get(name if name else (self.default or ""))


def field_path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def pydantic_problems(err: ValidationError) -> list[tuple[str, str]]:
    """``(field path, problem)`` for every error; the path is empty for the object itself."""
    return [
        (field_path(tuple(e["loc"])), e["msg"].removeprefix("Value error, ")) for e in err.errors()
    ]


def _join(prefix: str, problems: list[tuple[str, str]]) -> str:
    return "; ".join(
        f"{prefix}.{where}: {msg}" if where else f"{prefix}: {msg}" for where, msg in problems
    )


def build_chains(raw: Mapping[str, Any], *, source: str = "<extproc config>") -> Chains:
    """Validate ``raw`` (the parsed YAML) and build every chain. Raises ConfigError."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: expected a mapping with 'chains', got {type(raw).__name__}")
    try:
        spec = _FileSpec.model_validate(raw)
    except ValidationError as err:
        problems = pydantic_problems(err)
        raise ConfigError(
            "; ".join(f"{source}: {where or '(top)'}: {msg}" for where, msg in problems)
        ) from None
    chains: dict[str, Chain] = {}
    for chain_name, chain_spec in spec.chains.items():
        filters = []
        for i, f in enumerate(chain_spec.filters):
            where = f"{source}: chains.{chain_name}.filters[{i}]"
            factory = plugins.get("extproc.filter", f.name, where=where)
            try:
                config = factory.validate(f.options)
            except OptionsError as err:
                raise ConfigError(_join(f"{where}.options", err.problems), code=err.code) from None
            except ConfigError as err:
                raise ConfigError(f"{where}.options: {err}", code=err.code) from None
            filters.append(factory.create(config))
        chains[chain_name] = Chain(
            name=chain_name,
            filters=filters,
            fail_open=chain_spec.fail_open,
            message_timeout=chain_spec.message_timeout,
        )
    if spec.default_chain is not None and spec.default_chain not in chains:
        raise ConfigError(
            f"{source}: default_chain: {spec.default_chain!r} is not a chain "
            f"(chains: {', '.join(sorted(chains)) or 'none'})"
        )
    return Chains(chains=chains, default=spec.default_chain)


def load_chains(path: str | Path) -> Chains:
    """Read and validate the YAML file at ``path``."""
    p = Path(path)
    try:
        raw = _yaml.load_file(p) or {}
    except OSError as err:
        raise ConfigError(f"{p}: cannot read: {err.strerror}") from None
    return build_chains(raw, source=str(p))
