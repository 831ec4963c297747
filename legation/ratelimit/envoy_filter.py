"""Envoy-side wiring for the rate-limit service, as protobufs the mesh translation can embed.

For the translation engineer (and the integration tests, which build their bootstraps with these):

* :func:`rate_limit_filter` -> ``HttpFilter`` ``envoy.filters.http.ratelimit`` (domain, the gRPC
  cluster, ``failure_mode_deny`` derived from the service's ``failure_mode`` so both agree,
  ``enable_x_ratelimit_headers: DRAFT_VERSION_03``, a timeout). Put it before the router.
* :func:`route_rate_limits` -> ``[envoy.config.route.v3.RateLimit]`` for a route's (or virtual
  host's) ``rate_limits``: one ``RateLimit`` per descriptor, each a sequence of the specs below,
  in order (the order of the descriptor's entries, which the service's config nests in that order):
  :class:`RequestHeader` (header -> descriptor key), :class:`RemoteAddress` (``remote_address``),
  :class:`GenericKey`, :class:`Metadata` (dynamic metadata; :func:`jwt_claim` builds the one for a
  claim that ``jwt_authn`` put in metadata with ``payload_in_metadata``).
* :func:`rate_limit_cluster` -> the HTTP/2 ``Cluster`` pointing at the service.
* :func:`local_rate_limit_filter` -> Envoy's native ``envoy.filters.http.local_ratelimit``, for
  per-proxy limits that need no call-out (a token bucket per Envoy).

Example::

    hcm.http_filters.extend([rate_limit_filter(domain="edge", cluster="ratelimit"), router])
    route.route.rate_limits.extend(route_rate_limits(
        [GenericKey("api")], [RemoteAddress()], [RequestHeader("x-user", "user")]))
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import config_source_pb2
from envoy.config.ratelimit.v3 import rls_pb2 as rls_config_pb2
from envoy.config.route.v3 import route_components_pb2 as route_pb2
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2 as common_rl_pb2
from envoy.extensions.filters.http.local_ratelimit.v3 import local_rate_limit_pb2
from envoy.extensions.filters.http.ratelimit.v3 import rate_limit_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.type.metadata.v3 import metadata_pb2
from envoy.type.v3 import token_bucket_pb2
from google.protobuf import wrappers_pb2

from legation import envoy_grpc
from legation._proto import envoy_grpc as grpc_service
from legation._proto import every_request, http_filter, milliseconds
from legation.ratelimit.service import FAILURE_MODES

RATE_LIMIT_FILTER = "envoy.filters.http.ratelimit"
LOCAL_RATE_LIMIT_FILTER = "envoy.filters.http.local_ratelimit"
JWT_AUTHN_FILTER = "envoy.filters.http.jwt_authn"


@dataclass(frozen=True, slots=True)
class RequestHeader:
    """The value of request header ``header`` as descriptor entry ``key``."""

    header: str
    key: str
    skip_if_absent: bool = False


@dataclass(frozen=True, slots=True)
class RemoteAddress:
    """The trusted client address as entry ``remote_address``."""


@dataclass(frozen=True, slots=True)
class GenericKey:
    """A constant entry ``key: value`` (the key defaults to ``generic_key``)."""

    value: str
    key: str = ""


@dataclass(frozen=True, slots=True)
class Metadata:
    """A value from dynamic metadata ``filter`` at ``path`` as entry ``key``."""

    key: str
    filter: str
    path: tuple[str, ...]
    default: str = ""
    skip_if_absent: bool = False


DescriptorSpec = RequestHeader | RemoteAddress | GenericKey | Metadata


def jwt_claim(
    claim: str, key: str = "", *, payload_in_metadata: str = "jwt_payload", default: str = ""
) -> Metadata:
    """The JWT claim ``claim`` that jwt_authn stored under ``payload_in_metadata``."""
    return Metadata(
        key or claim,
        JWT_AUTHN_FILTER,
        (payload_in_metadata, claim),
        default,
        skip_if_absent=not default,
    )


def rate_limit_filter(
    *,
    domain: str,
    cluster: str,
    failure_mode: str = "allow",
    timeout_ms: int = 250,
    stage: int = 0,
    rate_limit_headers: bool = True,
) -> hcm_pb2.HttpFilter:
    """Envoy's ratelimit filter calling ``cluster``. ``failure_mode`` is the service's setting
    (``allow``, ``deny``, or ``local``, for which Envoy allows when the service itself cannot be
    reached: the service answers from memory while its store is away); the timeout should exceed
    the backend's so the service, not Envoy, decides on a slow store."""
    if failure_mode not in FAILURE_MODES:
        raise ValueError(f"failure_mode must be one of {FAILURE_MODES}, got {failure_mode!r}")
    config = rate_limit_pb2.RateLimit(
        domain=domain,
        stage=stage,
        failure_mode_deny=failure_mode == "deny",
        timeout=milliseconds(timeout_ms),
        rate_limit_service=rls_config_pb2.RateLimitServiceConfig(
            grpc_service=grpc_service(cluster),
            transport_api_version=config_source_pb2.V3,
        ),
    )
    if rate_limit_headers:
        config.enable_x_ratelimit_headers = rate_limit_pb2.RateLimit.DRAFT_VERSION_03
    return http_filter(RATE_LIMIT_FILTER, config)


def route_rate_limits(
    *descriptors: Sequence[DescriptorSpec], stage: int = 0
) -> list[route_pb2.RateLimit]:
    """One ``RateLimit`` per descriptor; each descriptor is a sequence of entry specs."""
    out = []
    for spec in descriptors:
        if not spec:
            raise ValueError("a rate-limit descriptor needs at least one entry")
        limit = route_pb2.RateLimit(actions=[_action(s) for s in spec])
        if stage:
            limit.stage.value = stage
        out.append(limit)
    return out


def rate_limit_cluster(
    name: str,
    host: str,
    port: int,
    *,
    connect_timeout_ms: int = 1000,
    max_concurrent_streams: int | None = None,
) -> cluster_pb2.Cluster:
    """A static HTTP/2 cluster for the gRPC service (see :mod:`legation.envoy_grpc`)."""
    return envoy_grpc.grpc_cluster(
        name,
        [(host, port)],
        connect_timeout_ms=connect_timeout_ms,
        max_concurrent_streams=max_concurrent_streams,
    )


def local_rate_limit_filter(
    *,
    stat_prefix: str,
    max_tokens: int,
    tokens_per_fill: int | None = None,
    fill_interval_ms: int = 1000,
    rate_limit_headers: bool = True,
) -> hcm_pb2.HttpFilter:
    """Envoy's native per-proxy token bucket (enabled and enforced for every request)."""
    every = every_request()
    config = local_rate_limit_pb2.LocalRateLimit(
        stat_prefix=stat_prefix,
        token_bucket=token_bucket_pb2.TokenBucket(
            max_tokens=max_tokens,
            tokens_per_fill=wrappers_pb2.UInt32Value(value=tokens_per_fill or max_tokens),
            fill_interval=milliseconds(fill_interval_ms),
        ),
        filter_enabled=every,
        filter_enforced=every,
    )
    if rate_limit_headers:
        config.enable_x_ratelimit_headers = common_rl_pb2.DRAFT_VERSION_03
    return http_filter(LOCAL_RATE_LIMIT_FILTER, config)


def _action(spec: DescriptorSpec) -> route_pb2.RateLimit.Action:
    action = route_pb2.RateLimit.Action()
    if isinstance(spec, RequestHeader):
        action.request_headers.header_name = spec.header
        action.request_headers.descriptor_key = spec.key
        action.request_headers.skip_if_absent = spec.skip_if_absent
    elif isinstance(spec, RemoteAddress):
        action.remote_address.SetInParent()
    elif isinstance(spec, GenericKey):
        action.generic_key.descriptor_value = spec.value
        if spec.key:
            action.generic_key.descriptor_key = spec.key
    elif isinstance(spec, Metadata):
        md = action.metadata
        md.descriptor_key = spec.key
        md.metadata_key.key = spec.filter
        md.metadata_key.path.extend(metadata_pb2.MetadataKey.PathSegment(key=p) for p in spec.path)
        md.default_value = spec.default
        md.source = route_pb2.RateLimit.Action.MetaData.DYNAMIC
        md.skip_if_absent = spec.skip_if_absent
    else:
        raise TypeError(f"not a rate-limit descriptor spec: {spec!r}")
    return action
