"""Resilience settings, per route or per service.

Route-level settings (also accepted on a service, where they are the defaults for every route to
it): ``timeout``, ``retries``, ``fault``, ``mirror``, ``local_rate_limit``.

Cluster-level settings (only on a service, because Envoy applies them to the upstream cluster):
``circuit_breakers``, ``outlier_detection``, ``load_balancer`` and the retry ``budget``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, model_validator

from legation.config._types import STRICT, Duration, HttpStatus, Name, Percent

#: Envoy ``retry_on`` conditions (router filter, x-envoy-retry-on and x-envoy-retry-grpc-on).
RetryOn = Literal[
    "5xx",
    "gateway-error",
    "reset",
    "reset-before-request",
    "connect-failure",
    "envoy-ratelimited",
    "retriable-4xx",
    "refused-stream",
    "retriable-status-codes",
    "retriable-headers",
    "http3-post-connect-failure",
    "cancelled",
    "deadline-exceeded",
    "internal",
    "resource-exhausted",
    "unavailable",
]

_DEFAULT_RETRY_ON: tuple[RetryOn, ...] = ("5xx",)


class RetryBudget(BaseModel):
    """At most ``percent`` of active requests may be retries (but always ``min_concurrency``)."""

    model_config = STRICT
    percent: Percent = 20.0
    min_concurrency: int = Field(default=3, ge=0)


class Retries(BaseModel):
    model_config = STRICT
    attempts: int = Field(ge=1, le=100, description="retries after the first try")
    retry_on: list[RetryOn] = Field(default_factory=lambda: list(_DEFAULT_RETRY_ON), min_length=1)
    per_try_timeout: Duration | None = None
    retriable_status_codes: list[HttpStatus] = Field(default_factory=list)
    budget: RetryBudget | None = Field(default=None, description="a cluster setting: services only")


class FaultDelay(BaseModel):
    model_config = STRICT
    percent: Percent
    duration: Duration


class FaultAbort(BaseModel):
    model_config = STRICT
    percent: Percent
    status: HttpStatus


class Fault(BaseModel):
    """Injected faults: a fixed delay and/or an abort with an HTTP status, each for a percentage."""

    model_config = STRICT
    delay: FaultDelay | None = None
    abort: FaultAbort | None = None

    @model_validator(mode="after")
    def _one_at_least(self) -> Fault:
        if self.delay is None and self.abort is None:
            raise ValueError("give a delay, an abort or both")
        return self


class Mirror(BaseModel):
    """Copy ``percent`` of requests to a shadow service (or a subset); its replies are dropped."""

    model_config = STRICT
    service: Name
    subset: Name | None = None
    percent: Percent = 100.0


class LocalRateLimit(BaseModel):
    """Envoy's native token bucket: ``requests`` per ``per``, bursts up to ``burst``."""

    model_config = STRICT
    requests: int = Field(ge=1)
    per: Duration
    burst: int | None = Field(default=None, ge=1)
    status: HttpStatus = 429


class CircuitBreakers(BaseModel):
    model_config = STRICT
    max_connections: int | None = Field(default=None, ge=1)
    max_pending_requests: int | None = Field(default=None, ge=1)
    max_requests: int | None = Field(default=None, ge=1)
    max_retries: int | None = Field(default=None, ge=0)


class OutlierDetection(BaseModel):
    model_config = STRICT
    consecutive_5xx: int = Field(default=5, ge=1)
    interval: Duration = Field(default="10s", validate_default=True)
    base_ejection_time: Duration = Field(default="30s", validate_default=True)
    max_ejection_percent: Percent = 10.0


class LoadBalancer(BaseModel):
    """``round_robin`` (default), ``least_request``, ``random``, or ``ring_hash`` on a header."""

    model_config = STRICT
    policy: Literal["round_robin", "least_request", "random", "ring_hash"] = "round_robin"
    hash_header: str | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _hash_header_iff_ring_hash(self) -> LoadBalancer:
        if self.policy == "ring_hash" and not self.hash_header:
            raise ValueError("ring_hash needs hash_header (the request header to hash on)")
        if self.policy != "ring_hash" and self.hash_header:
            raise ValueError(f"hash_header only applies to ring_hash, not {self.policy}")
        return self


class RoutePolicy(BaseModel):
    """The route-level settings; a service carries the same ones as defaults for its routes."""

    model_config = STRICT
    timeout: Duration | None = None
    retries: Retries | None = None
    fault: Fault | None = None
    mirror: Mirror | None = None
    local_rate_limit: LocalRateLimit | None = None


class ServicePolicy(RoutePolicy):
    """Route defaults plus the settings Envoy applies to the service's clusters."""

    connect_timeout: Duration = Field(default="1s", validate_default=True)
    circuit_breakers: CircuitBreakers | None = None
    outlier_detection: OutlierDetection | None = None
    load_balancer: LoadBalancer = Field(default_factory=LoadBalancer)
