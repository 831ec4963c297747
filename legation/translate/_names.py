"""Names shared by the translation modules (protobuf builders are in :mod:`legation._proto`).

Naming conventions (each proxy has its own snapshot, so names only need to be unique per proxy):

* clusters: ``outbound|<service>`` (every instance), ``outbound|<service>|<subset>``, and on a
  sidecar ``inbound|<service>`` (its local app). EDS names equal cluster names.
* listeners: ``inbound``, ``outbound`` (sidecars), ``gateway``; route configurations likewise.
* stat prefixes: ``inbound_<service>``, ``outbound_<service>``, ``gateway_<name>``, so Envoy stats
  read as ``http.outbound_reviews.downstream_rq_2xx`` and ``listener.gateway_ingress....``.
"""

from __future__ import annotations

INBOUND = "inbound"
OUTBOUND = "outbound"
GATEWAY = "gateway"

FAULT_FILTER = "envoy.filters.http.fault"
LOCAL_RATELIMIT_FILTER = "envoy.filters.http.local_ratelimit"
ROUTER_FILTER = "envoy.filters.http.router"
HCM_FILTER = "envoy.filters.network.http_connection_manager"
EARLY_HEADER_MUTATION = "envoy.http.early_header_mutation.header_mutation"
TCP_PROXY_FILTER = "envoy.filters.network.tcp_proxy"


def outbound_cluster(service: str, subset: str | None = None) -> str:
    return f"{OUTBOUND}|{service}" + (f"|{subset}" if subset else "")


def inbound_cluster(service: str) -> str:
    return f"{INBOUND}|{service}"
