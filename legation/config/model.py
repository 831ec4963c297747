"""The mesh model: services and their instances, the ingress gateway, routes, xDS address.

Every model rejects unknown keys and is frozen. This is the schema pass; the semantic pass
(references, duplicates, ports, weights) is in :mod:`legation.config.checks`.

Topology: each service instance (an *endpoint*: the app's host and port) may have a sidecar Envoy
with an inbound listener (``inbound_port``, forwarding to the app) and an outbound listener
(``outbound_port``, where the app sends requests for other services, routed by Host header). The
service's clusters point at the sidecars' inbound ports, or at the app itself when an endpoint has
no sidecar. One ingress gateway carries the routes marked ``gateway: true``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, Field, PrivateAttr

from legation.config._types import STRICT, Name, Port
from legation.config.accesslog import AccessLogService
from legation.config.capture import Capture
from legation.config.extensions import ExtAuthzService, ExtProcService, RateLimitService
from legation.config.mtls import Mtls
from legation.config.policy import ServicePolicy
from legation.config.routes import Route
from legation.config.tracing import Tracing

if TYPE_CHECKING:
    from legation.config.proxies import DemoSpec, ProxySpec

Host = str


class XdsAddress(BaseModel):
    """Where the control plane serves ADS."""

    model_config = STRICT
    host: Host = Field(default="127.0.0.1", min_length=1)
    port: Port = 18000


class Sidecar(BaseModel):
    """The sidecar Envoy of one service instance; it listens on the instance's host."""

    model_config = STRICT
    inbound_port: Port
    outbound_port: Port
    admin_port: Port


class Demo(BaseModel):
    """Run a :class:`legation.demo.DemoApp` at this endpoint (``legation up`` starts it)."""

    model_config = STRICT
    version: str | None = Field(default=None, min_length=1, description="default: labels.version")
    fail_every: int = Field(default=0, ge=0)
    delay_ms: int = Field(default=0, ge=0)


class Endpoint(BaseModel):
    """One service instance: where its app listens, its labels, its sidecar, maybe a demo app."""

    model_config = STRICT
    name: Name | None = None
    host: Host = Field(default="127.0.0.1", min_length=1)
    port: Port
    labels: dict[str, str] = Field(default_factory=dict)
    sidecar: Sidecar | None = None
    demo: Demo | None = None


class Subset(BaseModel):
    """A named group of a service's endpoints: those whose labels include all of ``labels``."""

    model_config = STRICT
    name: Name
    labels: dict[str, str] = Field(min_length=1)


class Service(ServicePolicy):
    """A service: its name (the Host clients use), port, protocol, instances and subsets.

    The resilience settings of :class:`ServicePolicy` are the defaults for routes to the service.
    """

    name: Name
    port: Port
    protocol: Literal["http", "grpc", "tcp"] = "http"
    endpoints: list[Endpoint] = Field(min_length=1)
    subsets: list[Subset] = Field(default_factory=list)

    def instance_name(self, index: int) -> str:
        """The endpoint's ``name``, or ``<service>-<index>``."""
        return self.endpoints[index].name or f"{self.name}-{index}"

    def subset(self, name: str) -> Subset | None:
        return next((s for s in self.subsets if s.name == name), None)

    def members(self, subset: str | None = None) -> list[Endpoint]:
        """The endpoints of the whole service, or of one subset (by label selection)."""
        if subset is None:
            return list(self.endpoints)
        spec = self.subset(subset)
        return self.selected(spec.labels) if spec is not None else []

    def selected(self, labels: dict[str, str]) -> list[Endpoint]:
        """The endpoints whose labels include all of ``labels``."""
        return [e for e in self.endpoints if labels.items() <= e.labels.items()]


class Gateway(BaseModel):
    """The ingress gateway: one HTTP listener carrying the routes marked ``gateway: true``."""

    model_config = STRICT
    name: Name = "ingress"
    host: Host = Field(default="127.0.0.1", min_length=1)
    port: Port
    admin_port: Port


class Mesh(BaseModel):
    """A whole mesh, as loaded from ``mesh.yaml`` by :func:`legation.config.load_mesh`."""

    model_config = STRICT
    xds: XdsAddress = Field(default_factory=XdsAddress)
    gateway: Gateway | None = None
    services: list[Service] = Field(default_factory=list)
    routes: list[Route] = Field(default_factory=list)
    extauthz: ExtAuthzService | None = None
    extproc: ExtProcService | None = None
    ratelimit: RateLimitService | None = None
    accesslog: AccessLogService | None = None
    mtls: Mtls = Field(default_factory=Mtls)
    # transparent capture (see legation.config.capture); None: apps call their sidecar explicitly
    capture: Capture | None = None
    tracing: Tracing | None = None  # spans to an OTLP collector (legation.config.tracing)
    # what Envoy does to a request path before routing and before any call-out sees it (Istio's
    # names): none; base (RFC 3986: dot segments resolved); merge_slashes (base, and `//` -> `/`);
    # decode_and_merge_slashes (also %2F/%5C decoded, then forwarded decoded). The default keeps
    # `//admin` from reaching a policy that matches `/admin`.
    path_normalization: Literal["none", "base", "merge_slashes", "decode_and_merge_slashes"] = (
        "merge_slashes"
    )

    # built once per loaded mesh by legation.services.chains.route_chains (plugin instances)
    _route_chains: Any = PrivateAttr(default=None)
    # built once per loaded mesh by legation.translate._fused.fused_routes
    _fused: Any = PrivateAttr(default=None)

    def service(self, name: str) -> Service | None:
        return next((s for s in self.services if s.name == name), None)

    def proxies(self) -> list[ProxySpec]:
        """The Envoy proxies this mesh runs: one sidecar per instance that declares one, then the
        ingress gateway."""
        from legation.config.proxies import proxies_of

        return proxies_of(self)

    def demo_apps(self) -> list[DemoSpec]:
        """The demo apps to start, one per endpoint that declares ``demo``."""
        from legation.config.proxies import demo_apps_of

        return demo_apps_of(self)
