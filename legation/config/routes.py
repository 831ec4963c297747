"""Routes: what a request matches, where it goes, and how it is changed on the way.

A route applies on the ingress gateway and/or, inside the mesh, to requests that sidecars send to
the services listed in ``mesh_hosts`` (by Host header). ``gateway`` defaults to true for a route
without ``mesh_hosts`` and to false for one with them. Routes are tried in the order they are
written; the first match wins. Inside the mesh, a service's routes are followed by a default route
to the whole service.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, model_validator

from legation.config._types import STRICT, HttpStatus, Name
from legation.config.attachments import FilterSpec, RateLimitSpec
from legation.config.policy import RoutePolicy
from legation.config.tracing import RouteTracing

HttpMethod = Literal["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE"]


def _exactly_one(model: BaseModel, names: tuple[str, ...]) -> None:
    given = [n for n in names if getattr(model, n) is not None]
    if len(given) != 1:
        got = f" (got {', '.join(given)})" if given else ""
        raise ValueError(f"give exactly one of {', '.join(names)}{got}")


class PathMatch(BaseModel):
    model_config = STRICT
    prefix: str | None = Field(default=None, pattern=r"^/")
    exact: str | None = Field(default=None, pattern=r"^/")
    regex: str | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _one(self) -> PathMatch:
        _exactly_one(self, ("prefix", "exact", "regex"))
        return self


class ValueMatch(BaseModel):
    """A header or query parameter: ``exact``, ``prefix``, ``regex`` or ``present``."""

    model_config = STRICT
    name: str = Field(min_length=1)
    exact: str | None = None
    prefix: str | None = Field(default=None, min_length=1)
    regex: str | None = Field(default=None, min_length=1)
    present: bool | None = None
    invert: bool = False

    @model_validator(mode="after")
    def _one(self) -> ValueMatch:
        _exactly_one(self, ("exact", "prefix", "regex", "present"))
        return self


class Match(BaseModel):
    model_config = STRICT
    path: PathMatch = Field(default_factory=lambda: PathMatch(prefix="/"))
    headers: list[ValueMatch] = Field(default_factory=list)
    query: list[ValueMatch] = Field(default_factory=list)
    methods: list[HttpMethod] = Field(default_factory=list)


class Destination(BaseModel):
    model_config = STRICT
    service: Name
    subset: Name | None = None


class WeightedDestination(Destination):
    weight: int = Field(ge=0, le=100)


class Redirect(BaseModel):
    model_config = STRICT
    scheme: Literal["http", "https"] | None = None
    host: str | None = Field(default=None, min_length=1)
    port: int | None = Field(default=None, ge=1, le=65535)
    path: str | None = Field(default=None, pattern=r"^/")
    prefix: str | None = Field(default=None, pattern=r"^/")
    status: Literal[301, 302, 303, 307, 308] = 301

    @model_validator(mode="after")
    def _path_or_prefix(self) -> Redirect:
        if self.path is not None and self.prefix is not None:
            raise ValueError("give path or prefix, not both")
        return self


class DirectResponse(BaseModel):
    model_config = STRICT
    status: HttpStatus
    body: str | None = None


class HeaderChanges(BaseModel):
    """``add`` appends a value, ``set`` replaces any existing value, ``remove`` drops headers."""

    model_config = STRICT
    add: dict[str, str] = Field(default_factory=dict)
    set: dict[str, str] = Field(default_factory=dict)
    remove: list[str] = Field(default_factory=list)


class Headers(BaseModel):
    model_config = STRICT
    request: HeaderChanges = Field(default_factory=HeaderChanges)
    response: HeaderChanges = Field(default_factory=HeaderChanges)


class Rewrite(BaseModel):
    """Rewrite the matched path prefix (``prefix``) and/or the Host header (``host``)."""

    model_config = STRICT
    prefix: str | None = Field(default=None, pattern=r"^/")
    host: str | None = Field(default=None, min_length=1)


ACTIONS = ("to", "split", "redirect", "direct_response")


class Route(RoutePolicy):
    """One route. Exactly one action: ``to``, ``split``, ``redirect`` or ``direct_response``.

    ``authz``, ``filters`` and ``rate_limits`` are placeholders for the request-path services
    (see :mod:`legation.config.extensions`); they are validated here and translated elsewhere.
    """

    name: Name
    gateway: bool | None = None
    mesh_hosts: list[Name] = Field(default_factory=list)
    match: Match = Field(default_factory=Match)
    to: Destination | None = None
    split: list[WeightedDestination] | None = Field(default=None, min_length=1)
    redirect: Redirect | None = None
    direct_response: DirectResponse | None = None
    headers: Headers = Field(default_factory=Headers)
    rewrite: Rewrite | None = None
    # the policy's name reaches ext_authz as a header value (HTTP call-out): no control characters
    authz: str | None = Field(default=None, min_length=1, pattern=r"^[^\x00-\x1f\x7f]+$")
    authz_protocol: Literal["grpc"] | None = None  # keep this route's ext_authz call on gRPC
    filters: list[FilterSpec] = Field(default_factory=list)
    rate_limits: list[RateLimitSpec] = Field(default_factory=list)
    tracing: RouteTracing | None = None  # this route's sampling rate

    @model_validator(mode="after")
    def _one_action(self) -> Route:
        _exactly_one(self, ACTIONS)
        return self

    @property
    def on_gateway(self) -> bool:
        return self.gateway if self.gateway is not None else not self.mesh_hosts

    def destinations(self) -> list[Destination]:
        """Where this route sends traffic (empty for redirects and direct responses)."""
        if self.to is not None:
            return [self.to]
        return list(self.split or [])
