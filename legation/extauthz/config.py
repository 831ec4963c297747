"""The service config file (YAML), validated with pydantic: unknown keys are errors.

```yaml
checks:                       # named check instances; ``type`` is a plugin name
  jwt:   {type: jwt, options: {providers: [...]}}
  authz: {type: rego, options: {policy_dir: policies}}
default_checks: [authz]       # when a route's context_extensions name no ``checks``
default_policy: envoy.authz   # when they name no ``policy``
dry_run: [envoy.beta]         # policies in audit mode: would-deny is logged, request passes
deny_status: 403              # status of a denial that names none
error_status: 403             # status when a check errors or times out (fail closed)
check_timeout_ms: 1000
decision_log: decisions.jsonl # JSON lines; "-" is the ``legation.extauthz.decisions`` logger
```

Each check's ``options`` go through its factory's ``validate`` at load time, so a bad option fails
at start. Every message starts with the file name and the dotted field.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from legation import _yaml, plugins
from legation.errors import ConfigError
from legation.extauthz._body import ProtoSet
from legation.extauthz.request import DEFAULT_OPTIONS, InputOptions

KIND = "extauthz.check"


class CheckSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    type: str
    options: dict[str, Any] = Field(default_factory=dict)


class ServiceConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    checks: dict[str, CheckSpec] = Field(default_factory=dict)
    default_checks: list[str] = Field(default_factory=list)
    default_policy: str | None = None
    dry_run: list[str] = Field(default_factory=list)
    deny_status: int = Field(default=403, ge=200, le=599)
    error_status: int = Field(default=403, ge=200, le=599)
    check_timeout_ms: int = Field(default=1000, gt=0, le=60_000)
    decision_log: str | None = None
    # opa-envoy-plugin's options of the same names: no parsed_body/truncated_body at all, and a
    # protobuf descriptor set (`protoc --descriptor_set_out`) to decode gRPC request bodies with
    skip_request_body_parse: bool = False
    proto_descriptor: str | None = None

    @model_validator(mode="after")
    def _known_defaults(self) -> ServiceConfig:
        for i, name in enumerate(self.default_checks):
            if name not in self.checks:
                raise ValueError(f"default_checks.{i}: no check named {name!r} in 'checks'")
        return self


@dataclass(frozen=True, kw_only=True)
class LoadedConfig:
    """The validated service config plus each check's typed, validated options."""

    service: ServiceConfig
    check_configs: Mapping[str, tuple[str, Any]]  # instance name -> (plugin type, config)
    source: str = "<inline>"
    input_options: InputOptions = DEFAULT_OPTIONS


def load_file(path: str | Path) -> LoadedConfig:
    """Load and validate a service config file; its relative paths are relative to its folder,
    whatever the working directory."""
    p = Path(path)
    try:
        raw = _yaml.load_file(p) or {}
    except OSError as e:
        raise ConfigError(f"{p}: cannot read: {e.strerror}") from None
    return load_mapping(resolve_paths(raw, p.resolve().parent), source=str(p))


# file options of the built-in checks, at any depth of their options
_PATH_KEYS = frozenset({"policy_dir", "jwks_file"})


def resolve_paths(raw: Any, folder: Path) -> Any:
    """The document with its relative paths (checks' ``policy_dir`` and ``jwks_file``,
    ``decision_log``, ``proto_descriptor``) made absolute against ``folder``."""
    if not isinstance(raw, dict):
        return raw  # load_mapping reports it
    out = dict(raw)
    for key in ("decision_log", "proto_descriptor"):
        target = out.get(key)
        if isinstance(target, str) and target != "-" and not Path(target).is_absolute():
            out[key] = str((folder / target).resolve())
    if isinstance(out.get("checks"), dict):
        out["checks"] = _resolve_in(out["checks"], folder)
    return out


def _resolve_in(value: Any, folder: Path) -> Any:
    if isinstance(value, list):
        return [_resolve_in(v, folder) for v in value]
    if not isinstance(value, dict):
        return value
    return {
        k: str((folder / v).resolve())
        if k in _PATH_KEYS and isinstance(v, str) and not Path(v).is_absolute()
        else _resolve_in(v, folder)
        for k, v in value.items()
    }


def load_mapping(raw: Any, *, source: str = "<inline>") -> LoadedConfig:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: the top level must be a mapping")
    try:
        service = ServiceConfig.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        field = ".".join(str(x) for x in first["loc"]) or "(top level)"
        raise ConfigError(f"{source}: {field}: {first['msg']}") from None
    configs: dict[str, tuple[str, Any]] = {}
    for name, spec in service.checks.items():
        where = f"{source}: checks.{name}"
        factory = plugins.get(KIND, spec.type, where=f"{where}.type")
        try:
            configs[name] = (spec.type, factory.validate(spec.options))
        except ConfigError as e:
            raise ConfigError(f"{where}.options: {e}", code=e.code) from None
    options = DEFAULT_OPTIONS
    if service.skip_request_body_parse or service.proto_descriptor:
        proto_set = None
        if service.proto_descriptor:
            try:
                proto_set = ProtoSet.load(service.proto_descriptor)
            except ConfigError as e:
                raise ConfigError(f"{source}: proto_descriptor: {e}", code=e.code) from None
        options = InputOptions(skip_body_parse=service.skip_request_body_parse, proto_set=proto_set)
    return LoadedConfig(
        service=service, check_configs=configs, source=source, input_options=options
    )


def pydantic_error(e: ValidationError) -> str:
    """``field.sub: message`` for the first error of a pydantic validation (for factories)."""
    first = e.errors()[0]
    field = ".".join(str(x) for x in first["loc"]) or "(top level)"
    return f"{field}: {first['msg']}"
