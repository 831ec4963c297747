"""The request-path services a mesh declares (ext_authz, ext_proc, rate limiting).
:mod:`legation.translate` turns them into Envoy filters, clusters and per-route config;
:mod:`legation.services` validates and starts the ``embedded`` ones.

At mesh level (``config`` paths are relative to the mesh file)::

    extauthz:  {port: 18010, config: authz.yaml}          # its own YAML: checks, policy dir
    extauthz:  {port: 18010, config: authz.yaml, protocol: http, http_port: 18020,  # + HTTP mode
                http_headers: {request: [x-tenant], upstream: [x-user], client: [x-cache]}}
    extauthz:  {..., protocol: http, http_socket: /run/legation/authz.sock}  # same host: Unix
    extproc:   {port: 18011, timeout: 200ms, protocol: http, http_port: 18021}  # chains: routes'
    ratelimit: {port: 18012, config: ratelimit.yaml, domain: mesh,   # envoyproxy/ratelimit YAML
                backend: memory}                          # or redis, with redis_url

The rate-limit block also takes upstream's service switches (``shadow_mode``, ``quota_mode``,
``merge_domains``, ``response_headers`` with ``response_header_names: {limit, remaining, reset}``,
``response_dynamic_metadata``) and the memory backend's bounds (``max_keys``, ``max_bytes``);
ext_proc's ``stream_idle_timeout`` (default 300s). Kinds, filter order: ``services.kinds.KINDS``.

Each block takes ``host`` (the bind address when embedded, where Envoy calls either way),
``failure_mode`` (``closed``: Envoy denies when the service cannot answer; ``open``: the request
passes; ext_authz and ext_proc default to closed, rate limiting to open), ``timeout`` (Envoy's
gRPC timeout; ext_proc's per-message timeout), ``embedded`` (default true: ``legation up`` and
``legation serve xds`` run the service in their own process; false: it runs elsewhere, at
``host:port``), ``workers`` (processes serving it: worker i on ``port + 100 * i``, one endpoint
each in Envoy's cluster, so adjacent service ports stay valid; default: the core count, at most 8,
when embedded, else 1; the rate limiter with ``backend: memory`` runs one) and ``tls``:

* ``mesh`` (the default when ``mtls.mode`` is permissive or strict; an error when mTLS is off):
  proxies call the service over mutual TLS with their workload certificate (SDS), and accept only
  a server certificate from the mesh CA whose URI SAN is
  ``spiffe://<trust_domain>/ns/<namespace>/sa/legation-<kind>``. An embedded service gets that
  certificate from the control plane (renewed like the proxies') and accepts only clients whose
  certificate chains to the mesh CA, i.e. the mesh's proxies. A service with ``embedded: false``
  must present such a certificate itself and should require client certificates from the CA.
* ``none`` (the default when mTLS is off): plaintext gRPC; anyone who reaches ``host:port`` may
  call the service, so keep it on loopback or a private network.

What a route asks of them (``authz``, ``filters``, ``rate_limits``) is
:mod:`legation.config.attachments`.
"""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING, Any, Literal

from pydantic import (
    BaseModel,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from legation.config._types import STRICT, Duration, Port
from legation.services import kinds

if TYPE_CHECKING:
    from legation.config.model import Mesh

FailureMode = Literal["closed", "open"]
FILTER_KIND = "extproc.filter"


def service_blocks(mesh: Mesh) -> list[tuple[str, GrpcService]]:
    """The request-path services ``mesh`` declares, as (kind name, block), in the order of
    :data:`legation.services.kinds.KINDS` (the one list of kinds)."""
    return [(kind.name, block) for kind, block in kinds.blocks(mesh)]


def _field_error(
    title: str, loc: tuple[str | int, ...], message: str, given: Any
) -> ValidationError:
    return _field_errors(title, [(loc, message)], given)


def _field_errors(
    title: str, problems: list[tuple[tuple[str | int, ...], str]], given: Any
) -> ValidationError:
    """Validation errors at ``loc``s below the field being validated (pydantic prefixes the rest),
    so a problem found by a plugin reads ``routes[0].filters[1].options.rules[0].value: ...``."""
    return ValidationError.from_exception_data(
        title,
        [
            InitErrorDetails(
                type=PydanticCustomError("value_error", "{error}", {"error": message}),
                loc=loc,
                input=given,
            )
            for loc, message in problems
        ],
    )


class GrpcService(BaseModel):
    """Where a request-path gRPC service listens, and what Envoy does when it cannot be reached:
    ``closed`` (deny, the default on the security path) or ``open`` (let the request through)."""

    model_config = STRICT
    host: str = Field(default="127.0.0.1", min_length=1)
    port: Port
    failure_mode: FailureMode = "closed"
    timeout: Duration = Field(default="250ms", validate_default=True)
    embedded: bool = True
    tls: Literal["mesh", "none"] | None = None  # None: mesh when the mesh's mTLS is on
    workers: int | None = Field(default=None, ge=1, le=64)

    @property
    def fail_open(self) -> bool:
        return self.failure_mode == "open"

    def worker_count(self) -> int:
        """``workers``, else the core count (at most 8) when embedded, 1 when elsewhere."""
        if self.workers is not None:
            return self.workers
        return min(8, max(1, len(os.sched_getaffinity(0)))) if self.embedded else 1

    def worker_ports(self, base: int) -> list[int]:
        """The ports of its workers for a service port ``base``: worker i on ``base + 100 i``."""
        return [base + kinds.WORKER_PORT_STEP * i for i in range(self.worker_count())]

    def mesh_tls(self, *, mtls_enabled: bool) -> bool:
        """Whether proxies call this service over mesh mTLS (see ``tls`` above)."""
        return self.tls == "mesh" or (self.tls is None and mtls_enabled)


class _ConfiguredService(GrpcService):
    """A service that reads its own config file (``config``, relative to the mesh file)."""

    config: str | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _config_when_embedded(self) -> _ConfiguredService:
        if self.embedded and self.config is None:
            raise _field_error(
                type(self).__name__,
                ("config",),
                "an embedded service needs its config file (or set embedded: false)",
                None,
            )
        return self


class HttpCalloutHeaders(BaseModel):
    """The headers Envoy passes between a request and the HTTP call-out (HTTP mode forwards only
    what its config lists): ``request`` names sent to the service besides method, path, Host,
    Content-Length and Authorization (``x-tenant`` or a ``prefix*``); ``upstream`` names a
    decision may add to the upstream request besides ``x-legation-*``; ``client`` names a
    decision may add to the client's response when it allows."""

    model_config = STRICT
    request: list[str] = Field(default_factory=list)
    upstream: list[str] = Field(default_factory=list)
    client: list[str] = Field(default_factory=list)

    @field_validator("request", "upstream", "client")
    @classmethod
    def _names(cls, names: list[str]) -> list[str]:
        for name in names:
            stem = name.rstrip("*")
            if not stem or not re.fullmatch(_HEADER_NAME, stem) or "*" in stem:
                raise ValueError(f"{name!r} is not a header name or a 'prefix*'")
            if stem.lower().startswith("x-legation-") or (
                name.endswith("*") and "x-legation-".startswith(stem.lower())
            ):
                raise ValueError(f"{name!r} would pass Legation's own x-legation-* headers")
        return names


class ExtAuthzService(_ConfiguredService):
    """ext_authz: ``config`` is the service's YAML (checks, Rego policy dir, JWT providers).

    ``protocol: http`` also serves the checks over Envoy's ext_authz HTTP mode on ``http_port``
    to routes whose needs fit it (:func:`legation.translate._authz.authz_call`); ``http_headers``
    lists what Envoy passes (:class:`HttpCalloutHeaders`).

    ``http_socket`` (instead of ``http_port``): the HTTP call-out on that Unix socket, for Envoys
    on the service's host (``legation up``'s): a cheaper path than loopback TCP, and only the
    service's user and group may connect (mode 0660). An absolute path, in a directory no other
    user can write (:mod:`legation._unix` says exactly which are refused: e.g.
    ``/run/legation/`` as root); worker i > 0 listens on ``<path>.<i>``."""

    protocol: Literal["grpc", "http"] = "grpc"
    http_port: Port | None = None
    http_socket: str | None = None
    http_headers: HttpCalloutHeaders | None = None

    @field_validator("http_socket")
    @classmethod
    def _socket_path(cls, path: str | None) -> str | None:
        from legation._unix import check_path

        if path is not None and (why := check_path(path)) is not None:
            raise ValueError(f"{path!r} {why}")
        return path

    @model_validator(mode="after")
    def _http(self) -> ExtAuthzService:
        if self.http_port is not None and self.http_socket is not None:
            raise _field_error(
                "ExtAuthzService", ("http_socket",), "give http_port or http_socket, not both", None
            )
        _check_http(self, "ExtAuthzService", ("http_port", "http_socket", "http_headers"))
        return self

    def worker_sockets(self) -> list[str]:
        """The HTTP call-out's socket per worker: ``http_socket``, then ``<path>.<i>``."""
        assert self.http_socket is not None
        return [worker_socket(self.http_socket, i) for i in range(self.worker_count())]

    @property
    def http(self) -> bool:
        """Whether the HTTP call-out is served (and routes may use it)."""
        return self.protocol == "http"


def worker_socket(path: str, worker: int) -> str:
    """Worker ``worker``'s Unix socket for a service socket ``path`` (worker 0: ``path``)."""
    return f"{path}.{worker}" if worker else path


def _check_http(block: Any, title: str, http_only: tuple[str, ...]) -> None:
    # http_only: used only then; ext_authz may listen on http_socket instead of http_port
    if block.protocol == "http" and block.http_port is None:
        if getattr(block, "http_socket", None) is None:
            also = " (or http_socket)" if hasattr(block, "http_socket") else ""
            raise _field_error(title, ("http_port",), f"needed with protocol: http{also}", None)
    for name in http_only:
        if block.protocol != "http" and getattr(block, name) is not None:
            raise _field_error(title, (name,), "only used with protocol: http", None)


class ExtProcService(GrpcService):
    """ext_proc: its chains are the routes' ``filters``; ``timeout`` is the per-message timeout;
    a stream silent for ``stream_idle_timeout`` is ended (keep it above the routes' timeouts).
    ``protocol: http`` also serves Envoy's ext_proc HTTP transport (WIP in Envoy) on ``http_port``
    to routes whose chain needs headers only, no state across them (``translate._extproc``)."""

    timeout: Duration = Field(default="200ms", validate_default=True)
    stream_idle_timeout: Duration = Field(default="300s", validate_default=True)
    protocol: Literal["grpc", "http"] = "grpc"
    http_port: Port | None = None

    @model_validator(mode="after")
    def _http(self) -> ExtProcService:
        _check_http(self, "ExtProcService", ("http_port",))
        return self

    @property
    def http(self) -> bool:
        return self.protocol == "http"


_HEADER_NAME = r"[A-Za-z0-9!#$%&'*+.^_`|~-]+"


class RateLimitHeaderNames(BaseModel):
    """The names of the RateLimit-* response headers (upstream's LIMIT_*_HEADER settings)."""

    model_config = STRICT
    limit: str = "RateLimit-Limit"
    remaining: str = "RateLimit-Remaining"
    reset: str = "RateLimit-Reset"

    @field_validator("limit", "remaining", "reset")
    @classmethod
    def _token(cls, name: str) -> str:
        if not re.fullmatch(_HEADER_NAME, name):
            raise ValueError(
                f"{name!r} is not an HTTP header name (letters, digits and !#$%&'*+.^_`|~- only)"
            )
        return name


class RateLimitService(_ConfiguredService):
    """Rate limiting: ``config`` is envoyproxy/ratelimit YAML declaring ``domain``.
    ``failure_mode: local`` (backend redis): while Redis is away the service counts in its own
    memory, each limit divided by ``local_instances`` (default 1); Envoy lets a request through
    when the service itself cannot answer (see :mod:`legation.ratelimit.fallback`)."""

    failure_mode: Literal["closed", "open", "local"] = "open"  # type: ignore[assignment]
    local_instances: int = Field(default=1, ge=1)  # failure_mode local: instances sharing limits
    domain: str = Field(default="mesh", min_length=1)
    backend: Literal["memory", "redis"] = "memory"
    redis_url: str | None = Field(default=None, min_length=1, repr=False)
    shadow_mode: bool = False  # upstream SHADOW_MODE: count and report, never limit
    quota_mode: bool = False  # upstream QUOTA_MODE: refuse only when every descriptor is over
    merge_domains: bool = False  # upstream MERGE_DOMAIN_CONFIG: files of one domain add up
    response_headers: bool = False  # upstream LIMIT_RESPONSE_HEADERS_ENABLED
    response_header_names: RateLimitHeaderNames = Field(default_factory=RateLimitHeaderNames)
    response_dynamic_metadata: bool = False  # upstream RESPONSE_DYNAMIC_METADATA
    max_keys: int | None = Field(default=None, ge=1)  # memory backend: counters kept at most
    max_bytes: int | None = Field(default=None, ge=65536)  # memory backend: their size bound

    @model_validator(mode="after")
    def _redis_url(self) -> RateLimitService:
        redis, problems = self.backend == "redis", []
        if redis and self.redis_url is None:
            problems.append(("redis_url", "needed with backend: redis"))
        if not redis and self.redis_url is not None:
            problems.append(("redis_url", "only used with backend: redis"))
        if self.backend == "memory" and (self.workers or 1) > 1:
            message = "the memory backend counts in one process: more than 1 needs backend: redis"
            problems.append(("workers", message))
        if self.failure_mode == "local" and not redis:
            problems.append(("failure_mode", "local is only used with backend: redis"))
        if "local_instances" in self.model_fields_set and self.failure_mode != "local":
            problems.append(("local_instances", "only used with failure_mode: local"))
        for name in ("max_keys", "max_bytes"):
            if redis and getattr(self, name) is not None:
                problems.append((name, "only used with backend: memory"))
        if "response_header_names" in self.model_fields_set and not self.response_headers:
            problems.append(("response_header_names", "only used with response_headers: true"))
        if problems:  # the input is not echoed: redis_url may hold a password
            raise _field_errors("RateLimitService", [((f,), m) for f, m in problems], None)
        return self

    def worker_count(self) -> int:
        """The memory backend's counters live in one process: one worker."""
        return 1 if self.backend == "memory" else super().worker_count()

    @property
    def fail_open(self) -> bool:
        """Envoy's side: with ``local`` the service answers, so Envoy allows when it cannot."""
        return self.failure_mode in ("open", "local")

    def backend_options(self) -> dict[str, Any]:
        """The backend plugin's options, from this block."""
        if self.backend == "redis":
            return {"url": self.redis_url}
        return {k: v for k in ("max_keys", "max_bytes") if (v := getattr(self, k)) is not None}
