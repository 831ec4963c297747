"""What a route attaches to the request-path services: ext_proc filter plugins with their options
(validated by each plugin's factory when the mesh loads) and rate-limit descriptor actions.

On a route::

    authz: reviews.authz           # a Rego policy (package) for ext_authz, or ``disabled``;
                                   # a route without authz makes no ext_authz call
    authz_protocol: grpc           # with extauthz.protocol http: keep this route on gRPC
    filters:                       # ext_proc filter plugins, in order (options validated here,
      - {name: request_id, options: {header: x-request-id}}   # by the plugin, at mesh load)
    rate_limits:                   # descriptors sent to the rate-limit service
      - actions:
          - {generic_key: {value: reviews}}
          - {request_headers: {header: x-user, key: user}}
          - {remote_address: {}}
          - {jwt_claim: {claim: sub, key: user}}   # a claim the ext_authz jwt check verified
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import (
    BaseModel,
    Field,
    PrivateAttr,
    field_validator,
    model_validator,
)

from legation import plugins
from legation.config._types import STRICT
from legation.config.extensions import FILTER_KIND, _field_errors
from legation.errors import ConfigError

__all__ = [
    "FilterSpec",
    "GenericKey",
    "JwtClaim",
    "RateLimitAction",
    "RateLimitSpec",
    "RemoteAddress",
    "RequestHeaders",
    "validate_filter",
]


class FilterSpec(BaseModel):
    """One ext_proc filter plugin by name, with its options, validated by the plugin's factory
    when the mesh is loaded: a bad option is a mesh error naming ``...options.<field>``."""

    model_config = STRICT
    name: str = Field(min_length=1)
    # validated even when omitted: a filter whose options are required must say so at load
    options: dict[str, Any] = Field(default_factory=dict, validate_default=True)

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        try:
            plugins.get(FILTER_KIND, name)
        except ConfigError as err:
            raise ValueError(str(err)) from None
        return name

    # the plugin's typed config, validated once when the mesh loads (routes' chains use it)
    _config: Any = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _valid(self) -> FilterSpec:
        self._config = validate_filter(self.name, self.options, title="FilterSpec", at=("options",))
        return self

    @property
    def config(self) -> Any:
        """The plugin's validated config for ``options`` (what its factory's ``create`` takes)."""
        return self._config


def validate_filter(
    name: str, options: Mapping[str, Any], *, title: str = "filter", at: tuple[str, ...] = ()
) -> Any:
    """The plugin's typed config for ``options``; a ValidationError located within the options
    (below ``at``)."""
    factory = plugins.get(FILTER_KIND, name)
    try:
        return factory.validate(dict(options))
    except ConfigError as err:
        problems: list[tuple[str, str]] = getattr(err, "problems", None) or [("", str(err))]
        located: list[tuple[tuple[str | int, ...], str]] = [
            ((*at, where) if where else at, message) for where, message in problems
        ]
        raise _field_errors(title, located, dict(options)) from None


class GenericKey(BaseModel):
    model_config = STRICT
    value: str = Field(min_length=1)
    key: str = Field(default="generic_key", min_length=1)


class RequestHeaders(BaseModel):
    model_config = STRICT
    header: str = Field(min_length=1)
    key: str = Field(min_length=1)
    skip_if_absent: bool = False


class JwtClaim(BaseModel):
    """A claim of the token the ext_authz ``jwt`` check verified on this request. The provider
    must list it in ``claims_to_metadata``; requests without it are not counted by this limit."""

    model_config = STRICT
    claim: str = Field(min_length=1)
    key: str | None = Field(default=None, min_length=1, description="default: the claim name")


class RemoteAddress(BaseModel):
    model_config = STRICT


class RateLimitAction(BaseModel):
    """Exactly one descriptor entry source, as in Envoy's ``rate_limits[].actions[]``."""

    model_config = STRICT
    generic_key: GenericKey | None = None
    request_headers: RequestHeaders | None = None
    remote_address: RemoteAddress | None = None
    jwt_claim: JwtClaim | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> RateLimitAction:
        names = ("generic_key", "request_headers", "remote_address", "jwt_claim")
        given = [n for n in names if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of generic_key, request_headers, remote_address, jwt_claim"
                + (f" (got {', '.join(given)})" if given else "")
            )
        return self


class RateLimitSpec(BaseModel):
    """One descriptor: the entries its actions produce, sent together to the rate-limit service."""

    model_config = STRICT
    actions: list[RateLimitAction] = Field(min_length=1)
