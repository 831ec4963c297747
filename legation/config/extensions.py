"""Placeholders for the request-path services (ext_authz, ext_proc, rate limiting).

Their shape is validated now so that meshes can declare them; translating them into Envoy filters
belongs to each service's package (``legation/<pkg>/envoy_filter.py``), which reads these models.

At mesh level::

    extauthz:  {host: 127.0.0.1, port: 18001, failure_mode: closed, timeout: 250ms}
    extproc:   {host: 127.0.0.1, port: 18002, failure_mode: closed, timeout: 250ms}
    ratelimit: {host: 127.0.0.1, port: 18003, failure_mode: open, timeout: 250ms, domain: mesh}

On a route::

    authz: reviews-policy          # a policy name, or ``disabled`` to skip ext_authz here
    filters:                       # ext_proc filter plugins, in order
      - {name: request_id, options: {header: x-request-id}}
    rate_limits:                   # descriptors sent to the rate-limit service
      - actions:
          - {generic_key: {value: reviews}}
          - {request_headers: {header: x-user, key: user}}
          - {remote_address: {}}
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator

from legation.config._types import STRICT, Duration, Port

FailureMode = Literal["closed", "open"]


class GrpcService(BaseModel):
    """Where a request-path gRPC service listens, and what Envoy does when it cannot be reached:
    ``closed`` (deny, the default on the security path) or ``open`` (let the request through)."""

    model_config = STRICT
    host: str = Field(default="127.0.0.1", min_length=1)
    port: Port
    failure_mode: FailureMode = "closed"
    timeout: Duration = Field(default="250ms", validate_default=True)


class RateLimitService(GrpcService):
    failure_mode: FailureMode = "open"
    domain: str = Field(default="mesh", min_length=1)


class FilterSpec(BaseModel):
    """One ext_proc filter plugin by name, with its options (validated by the plugin itself)."""

    model_config = STRICT
    name: str = Field(min_length=1)
    options: dict[str, Any] = Field(default_factory=dict)


class GenericKey(BaseModel):
    model_config = STRICT
    value: str = Field(min_length=1)
    key: str = Field(default="generic_key", min_length=1)


class RequestHeaders(BaseModel):
    model_config = STRICT
    header: str = Field(min_length=1)
    key: str = Field(min_length=1)
    skip_if_absent: bool = False


class RemoteAddress(BaseModel):
    model_config = STRICT


class RateLimitAction(BaseModel):
    """Exactly one descriptor entry source, as in Envoy's ``rate_limits[].actions[]``."""

    model_config = STRICT
    generic_key: GenericKey | None = None
    request_headers: RequestHeaders | None = None
    remote_address: RemoteAddress | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> RateLimitAction:
        names = ("generic_key", "request_headers", "remote_address")
        given = [n for n in names if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of generic_key, request_headers, remote_address"
                + (f" (got {', '.join(given)})" if given else "")
            )
        return self


class RateLimitSpec(BaseModel):
    """One descriptor: the entries its actions produce, sent together to the rate-limit service."""

    model_config = STRICT
    actions: list[RateLimitAction] = Field(min_length=1)
