"""What a mesh asks to run: its Envoy proxies and its demo apps, as plain frozen records.

``legation up`` starts an Envoy for each :class:`ProxySpec` (bootstrapped with its node id, node
cluster and admin port) and a :class:`legation.demo.DemoApp` for each :class:`DemoSpec`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from legation.config.model import Mesh

SIDECAR_PREFIX = "sidecar-"
GATEWAY_PREFIX = "gateway-"


@dataclass(frozen=True, slots=True)
class ListenerSpec:
    """A listener a proxy binds, named as in its snapshot: inbound, outbound or gateway."""

    name: str
    host: str
    port: int


@dataclass(frozen=True, slots=True)
class ProxySpec:
    """One Envoy: its xDS node id and cluster, its admin port and the listeners it will bind."""

    node_id: str
    node_cluster: str
    kind: Literal["sidecar", "gateway"]
    admin_port: int
    listeners: list[ListenerSpec] = field(default_factory=list)
    service: str | None = None  # sidecars: the service of the instance
    instance: str | None = None  # sidecars: the instance (endpoint) name


@dataclass(frozen=True, slots=True)
class DemoSpec:
    service: str
    version: str
    host: str
    port: int
    fail_every: int = 0
    delay_ms: int = 0
    outbound_port: int | None = None  # its sidecar's outbound listener, for ``?call=``
    instance: str = ""  # the endpoint's instance name (its pod's, with capture)


def sidecar_node_id(instance: str) -> str:
    return SIDECAR_PREFIX + instance


def gateway_node_id(gateway: str) -> str:
    return GATEWAY_PREFIX + gateway


def proxies_of(mesh: Mesh) -> list[ProxySpec]:
    out: list[ProxySpec] = []
    for service in mesh.services:
        for i, ep in enumerate(service.endpoints):
            if ep.sidecar is None:
                continue
            instance = service.instance_name(i)
            out.append(
                ProxySpec(
                    node_id=sidecar_node_id(instance),
                    node_cluster=service.name,
                    kind="sidecar",
                    admin_port=ep.sidecar.admin_port,
                    listeners=[
                        ListenerSpec("inbound", ep.host, ep.sidecar.inbound_port),
                        ListenerSpec("outbound", ep.host, ep.sidecar.outbound_port),
                    ],
                    service=service.name,
                    instance=instance,
                )
            )
    if mesh.gateway is not None:
        gw = mesh.gateway
        out.append(
            ProxySpec(
                node_id=gateway_node_id(gw.name),
                node_cluster=gw.name,
                kind="gateway",
                admin_port=gw.admin_port,
                listeners=[ListenerSpec("gateway", gw.host, gw.port)],
            )
        )
    return out


def demo_apps_of(mesh: Mesh) -> list[DemoSpec]:
    return [
        DemoSpec(
            service=service.name,
            version=ep.demo.version or ep.labels.get("version", "v1"),
            host=ep.host,
            port=ep.port,
            fail_every=ep.demo.fail_every,
            delay_ms=ep.demo.delay_ms,
            outbound_port=ep.sidecar.outbound_port if ep.sidecar else None,
            instance=service.instance_name(i),
        )
        for service in mesh.services
        for i, ep in enumerate(service.endpoints)
        if ep.demo is not None
    ]
