"""Envoy bootstraps that point a proxy at the Legation xDS server over ADS.

The bootstrap is the only static config a proxy needs: its node identity, an admin address, and a
``legation_xds`` cluster for the ADS stream; clusters and listeners (and through them endpoints,
routes and secrets) all come over ADS. ``envoy/bootstrap.yaml`` in the repository is this output
for an example node, kept identical by a test.

The ADS channel is TLS both ways (see :mod:`legation.certs.enrol`): the proxy presents its
enrolment credential, read through file-based SDS from its credentials directory (watched, so a
re-issued credential is picked up without a restart), and accepts only a server whose
certificate, signed by the mesh CA (``ca.crt`` in the same directory), carries the control plane's
identity. ``stats_config`` tags every stat with the node (:mod:`legation.translate._stats`).
"""

from __future__ import annotations

import ipaddress
from pathlib import PurePath
from typing import Any

from legation.certs.enrol import CLIENT_SDS_FILE, CLIENT_SECRET, ROOT_FILE, XDS_SERVER_ID
from legation.translate._stats import stats_config

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
    credentials_dir: str | PurePath | None,
) -> dict[str, Any]:
    """An Envoy v3 bootstrap as a dict (serialise with yaml or json). ``credentials_dir``: where
    the node's enrolment files are (as the proxy sees them); None only for a server in its
    insecure test mode."""
    ads_source = {"ads": {}, "resource_api_version": "V3"}
    cluster: dict[str, Any] = {
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
                                    "socket_address": {"address": xds_host, "port_value": xds_port}
                                }
                            }
                        }
                    ]
                }
            ],
        },
    }
    if credentials_dir is not None:
        cluster["transport_socket"] = xds_transport_socket(PurePath(credentials_dir), xds_host)
    return {
        "node": {"id": node_id, "cluster": node_cluster or node_id},
        "admin": {"address": {"socket_address": {"address": admin_host, "port_value": admin_port}}},
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
        "static_resources": {"clusters": [cluster]},
        "stats_config": stats_config(node_id, node_cluster or node_id),
    }


def xds_transport_socket(credentials_dir: PurePath, xds_host: str) -> dict[str, Any]:
    """TLS to the xDS server: the node's credential through watched file-based SDS, the server
    verified against the mesh CA and matched on the control plane's URI SAN."""
    context: dict[str, Any] = {
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
        "common_tls_context": {
            "alpn_protocols": ["h2"],
            "tls_certificate_sds_secret_configs": [
                {
                    "name": CLIENT_SECRET,
                    "sds_config": {
                        "path_config_source": {
                            "path": str(credentials_dir / CLIENT_SDS_FILE),
                            "watched_directory": {"path": str(credentials_dir)},
                        },
                        "resource_api_version": "V3",
                    },
                }
            ],
            "validation_context": {
                "trusted_ca": {"filename": str(credentials_dir / ROOT_FILE)},
                "match_typed_subject_alt_names": [
                    {"san_type": "URI", "matcher": {"exact": XDS_SERVER_ID}}
                ],
            },
        },
    }
    if not _is_ip(xds_host):
        context["sni"] = xds_host
    return {"name": "envoy.transport_sockets.tls", "typed_config": context}
