"""Builders for the Envoys the tests run: a static bootstrap's skeleton, and a whole mesh.

* :func:`static_bootstrap` - one ``ingress`` listener on loopback with an HTTP connection manager
  (the test's filters, then the router) and its inline routes, the test's clusters, an admin
  port. The service test packages (ext_authz, ext_proc, ratelimit) put their own filter, routes
  and gRPC cluster into it.
* :class:`MeshWorld` - a control plane on a :class:`~tests.loop.LoopThread` serving, over ADS, a
  real Envoy for every proxy its mesh declares.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from legation.controlplane import ControlPlane
from legation.envoy_process import EnvoyProcess
from legation.translate.bootstrap import bootstrap
from tests.loop import LoopThread

HCM_TYPE = (
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager"
    ".v3.HttpConnectionManager"
)
ROUTER = {
    "name": "envoy.filters.http.router",
    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
}


def static_cluster(name: str, port: int, host: str = "127.0.0.1") -> dict[str, Any]:
    """A STATIC cluster of one endpoint (HTTP/1.1, as the demo apps speak)."""
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {"socket_address": {"address": host, "port_value": port}}
                            }
                        }
                    ]
                }
            ],
        },
    }


def static_bootstrap(
    *,
    listen_port: int,
    admin_port: int,
    routes: Sequence[dict[str, Any]],
    http_filters: Sequence[dict[str, Any]],
    clusters: Sequence[dict[str, Any]],
) -> dict[str, Any]:
    """An Envoy bootstrap with no control plane: ``http_filters`` (dicts) run before the
    router, ``routes`` (dicts) are the one virtual host's, on any Host."""
    hcm = {
        "@type": HCM_TYPE,
        "stat_prefix": "ingress",
        "route_config": {
            "name": "local",
            "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": list(routes)}],
        },
        "http_filters": [*http_filters, ROUTER],
    }
    return {
        "admin": {
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}
        },
        "static_resources": {
            "listeners": [
                {
                    "name": "ingress",
                    "address": {
                        "socket_address": {"address": "127.0.0.1", "port_value": listen_port}
                    },
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": hcm,
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": list(clusters),
        },
    }


class MeshWorld:
    """A control plane serving ``mesh_path`` from a loop thread, and a real Envoy per proxy.

    ``start()`` starts the control plane, then an Envoy for each proxy the loaded mesh declares
    (bootstrapped over ADS with a freshly enrolled credential), and waits until all are in
    sync; ``close()`` stops them all. ``envoys`` maps node id to its Envoy, in the mesh's proxy
    order (sidecars, then the gateway)."""

    def __init__(self, tmp: Path, mesh_path: Path, *, status_port: int = 0) -> None:
        self.tmp = tmp
        self.mesh_path = mesh_path
        self.loop = LoopThread()
        self.cp = ControlPlane(
            mesh_path,
            status_port=status_port,
            poll_interval=3600,
            debounce=0.01,
            on_event=lambda line: None,
            ca_dir=tmp / "ca",
        )
        self.envoys: dict[str, EnvoyProcess] = {}

    def start(self) -> None:
        self.loop.run(self.cp.start())
        assert self.cp.mesh is not None
        for proxy in self.cp.mesh.proxies():
            config = bootstrap(
                node_id=proxy.node_id,
                node_cluster=proxy.node_cluster,
                xds_host="127.0.0.1",
                xds_port=self.cp.mesh.xds.port,
                admin_port=proxy.admin_port,
                credentials_dir=self.cp.enrol(proxy.node_id)[1].directory,
            )
            self.envoys[proxy.node_id] = EnvoyProcess(
                config, admin_port=proxy.admin_port, name=proxy.node_id, log_dir=self.tmp
            ).start()
        for envoy in self.envoys.values():
            envoy.wait_live()
        self.wait_in_sync()

    def wait_in_sync(self) -> None:
        deadline = time.monotonic() + 20
        while not all(p["in_sync"] for p in self.status()["proxies"]):
            assert time.monotonic() < deadline, self.status()
            time.sleep(0.05)

    def status(self) -> dict[str, Any]:
        async def get() -> dict[str, Any]:
            return self.cp.status()

        return self.loop.run(get())

    def close(self) -> None:
        for envoy in self.envoys.values():
            envoy.stop()
        self.loop.run(self.cp.stop())
        self.loop.close()
