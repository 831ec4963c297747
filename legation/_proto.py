"""Small protobuf builders shared by every module that writes Envoy config.

The mesh translation (:mod:`legation.translate`), the services' Envoy wiring (``envoy_filter``
modules, :mod:`legation.envoy_grpc`) and the SDS secrets all build the same few messages: an
``Any``, a ``Duration``, the ADS config source, a socket address, a gRPC service behind an Envoy
cluster. They are written once, here.
"""

from __future__ import annotations

from datetime import timedelta

from envoy.config.core.v3 import address_pb2, base_pb2, config_source_pb2, grpc_service_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.type.v3 import percent_pb2
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message

__all__ = [
    "address",
    "ads_source",
    "duration",
    "envoy_grpc",
    "every_request",
    "http_filter",
    "milliseconds",
    "pack",
    "pipe",
    "seconds",
]


def pack(message: Message) -> any_pb2.Any:
    """``message`` in an ``Any`` (for ``typed_config`` and ``typed_per_filter_config``)."""
    out = any_pb2.Any()
    out.Pack(message)
    return out


def duration(value: timedelta) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromTimedelta(value)
    return d


def seconds(value: float) -> duration_pb2.Duration:
    """A duration of ``value`` seconds, to the nanosecond."""
    d = duration_pb2.Duration()
    d.FromNanoseconds(round(value * 1e9))
    return d


def milliseconds(value: int) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromMilliseconds(value)
    return d


def ads_source() -> config_source_pb2.ConfigSource:
    """Resources come over the proxy's ADS stream, in the v3 API."""
    return config_source_pb2.ConfigSource(
        ads=config_source_pb2.AggregatedConfigSource(),
        resource_api_version=config_source_pb2.V3,
    )


def address(host: str, port: int) -> address_pb2.Address:
    """A TCP socket address."""
    return address_pb2.Address(
        socket_address=address_pb2.SocketAddress(address=host, port_value=port)
    )


def pipe(path: str) -> address_pb2.Address:
    """A Unix socket address."""
    return address_pb2.Address(pipe=address_pb2.Pipe(path=path))


def envoy_grpc(
    cluster: str, *, timeout: duration_pb2.Duration | None = None
) -> grpc_service_pb2.GrpcService:
    """A gRPC service reached through Envoy's own client, over ``cluster``."""
    service = grpc_service_pb2.GrpcService(
        envoy_grpc=grpc_service_pb2.GrpcService.EnvoyGrpc(cluster_name=cluster)
    )
    if timeout is not None:
        service.timeout.CopyFrom(timeout)
    return service


def http_filter(name: str, config: Message) -> hcm_pb2.HttpFilter:
    """An HTTP connection manager filter with its typed config."""
    return hcm_pb2.HttpFilter(name=name, typed_config=pack(config))


def every_request() -> base_pb2.RuntimeFractionalPercent:
    """100% of requests (a filter's ``filter_enabled`` / ``filter_enforced``)."""
    return base_pb2.RuntimeFractionalPercent(
        default_value=percent_pb2.FractionalPercent(
            numerator=100, denominator=percent_pb2.FractionalPercent.HUNDRED
        )
    )
