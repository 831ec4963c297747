"""Envoy bootstraps that point a proxy at the Legation xDS server over ADS.

The bootstrap is the only static config a proxy needs: its node identity, an admin address, and a
``legation_xds`` cluster for the ADS stream; clusters and listeners (and through them endpoints,
routes and secrets) all come over ADS. ``envoy/bootstrap.yaml`` in the repository is this output
for an example node, kept identical by a test.
"""

from __future__ import annotations

import ipaddress
from typing import Any

XDS_CLUSTER = "legation_xds"


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def bootstrap(
    *,
    node_id: str,
    node_cluster: str = "",
    xds_host: str = "127.0.0.1",
    xds_port: int = 18000,
    admin_host: str = "127.0.0.1",
    admin_port: int = 9901,
    delta: bool = False,
) -> dict[str, Any]:
    """An Envoy v3 bootstrap as a dict (serialise with yaml or json)."""
    ads_source = {"ads": {}, "resource_api_version": "V3"}
    return {
        "node": {"id": node_id, "cluster": node_cluster or node_id},
        "admin": {
            "address": {"socket_address": {"address": admin_host, "port_value": admin_port}}
        },
        "dynamic_resources": {
            "ads_config": {
                "api_type": "DELTA_GRPC" if delta else "GRPC",
                "transport_api_version": "V3",
                "grpc_services": [{"envoy_grpc": {"cluster_name": XDS_CLUSTER}}],
                "set_node_on_first_message_only": True,
            },
            "cds_config": ads_source,
            "lds_config": ads_source,
        },
        "static_resources": {
            "clusters": [
                {
                    "name": XDS_CLUSTER,
                    "type": "STATIC" if _is_ip(xds_host) else "STRICT_DNS",
                    "connect_timeout": "1s",
                    "typed_extension_protocol_options": {
                        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                            "@type": "type.googleapis.com/"
                            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                            "explicit_http_config": {
                                "http2_protocol_options": {
                                    "connection_keepalive": {"interval": "30s", "timeout": "5s"}
                                }
                            },
                        }
                    },
                    "load_assignment": {
                        "cluster_name": XDS_CLUSTER,
                        "endpoints": [
                            {
                                "lb_endpoints": [
                                    {
                                        "endpoint": {
                                            "address": {
                                                "socket_address": {
                                                    "address": xds_host,
                                                    "port_value": xds_port,
                                                }
                                            }
                                        }
                                    }
                                ]
                            }
                        ],
                    },
                }
            ]
        },
    }
