"""Names and small protobuf builders shared by the translation modules.

Naming conventions (each proxy has its own snapshot, so names only need to be unique per proxy):

* clusters: ``outbound|<service>`` (every instance), ``outbound|<service>|<subset>``, and on a
  sidecar ``inbound|<service>`` (its local app). EDS names equal cluster names.
* listeners: ``inbound``, ``outbound`` (sidecars), ``gateway``; route configurations likewise.
* stat prefixes: ``inbound_<service>``, ``outbound_<service>``, ``gateway_<name>``, so Envoy stats
  read as ``http.outbound_reviews.downstream_rq_2xx`` and ``listener.gateway_ingress....``.
"""

from __future__ import annotations

from datetime import timedelta

from envoy.config.core.v3 import address_pb2, config_source_pb2
from envoy.type.v3 import percent_pb2
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message

INBOUND = "inbound"
OUTBOUND = "outbound"
GATEWAY = "gateway"

FAULT_FILTER = "envoy.filters.http.fault"
LOCAL_RATELIMIT_FILTER = "envoy.filters.http.local_ratelimit"
ROUTER_FILTER = "envoy.filters.http.router"
HCM_FILTER = "envoy.filters.network.http_connection_manager"
TCP_PROXY_FILTER = "envoy.filters.network.tcp_proxy"


def outbound_cluster(service: str, subset: str | None = None) -> str:
    return f"{OUTBOUND}|{service}" + (f"|{subset}" if subset else "")


def inbound_cluster(service: str) -> str:
    return f"{INBOUND}|{service}"


def ads_source() -> config_source_pb2.ConfigSource:
    """Resources come over the proxy's ADS stream, in the v3 API."""
    return config_source_pb2.ConfigSource(
        ads=config_source_pb2.AggregatedConfigSource(),
        resource_api_version=config_source_pb2.V3,
    )


def duration(value: timedelta) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromTimedelta(value)
    return d


def fraction(percent: float) -> percent_pb2.FractionalPercent:
    """A percentage as parts per million (so 0.1% survives)."""
    return percent_pb2.FractionalPercent(
        numerator=round(percent * 10_000), denominator=percent_pb2.FractionalPercent.MILLION
    )


def pack(message: Message) -> any_pb2.Any:
    out = any_pb2.Any()
    out.Pack(message)
    return out


def socket(host: str, port: int) -> address_pb2.Address:
    return address_pb2.Address(
        socket_address=address_pb2.SocketAddress(address=host, port_value=port)
    )
