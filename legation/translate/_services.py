"""The request-path services in a proxy's config: HTTP filters, gRPC clusters, per-route settings.

When the mesh declares ``extauthz``, ``extproc`` or ``ratelimit``, the connection managers that
carry mesh routes (the gateway, and sidecars' ``outbound`` listeners) get the service's filter,
after Envoy's native fault and local_ratelimit filters and before the router, in this order:

1. ``ext_authz``: deny first, before any other call-out is spent on the request;
2. ``ext_proc``: the route's filter chain (it may set headers, e.g. a cohort, that re-match the
   route and that rate-limit descriptors read);
3. ``ratelimit``: count only requests that were allowed and are about to be forwarded.

Sidecar ``inbound`` listeners get none of them: the caller's side (gateway or outbound sidecar)
already applied the route's settings, as it does for timeouts and retries.

Every route in those route configurations says what each filter does there, so a request makes
no call-out that its route does not ask for: ext_authz is ``disabled`` unless the route has an
``authz`` policy (which travels in ``context_extensions["policy"]``); ext_proc is ``disabled``
unless the route has ``filters`` (its chain, named after the route, travels in the stream's
``x-legation-chain`` metadata with the processing mode its filters need); a route's
``rate_limits`` become its route action's descriptor actions. Envoy fails closed or open as each
block's ``failure_mode`` says.

A service whose block uses mesh TLS (``tls: mesh``, the default when the mesh's mTLS is on) is
called over mutual TLS: its cluster presents the proxy's workload certificate (SDS
``legation-workload-cert``), verifies the server against the trust bundle (SDS
``legation-trust-bundle``) and accepts only the URI SAN
``spiffe://<trust_domain>/ns/<namespace>/sa/legation-<kind>``, offering ALPN ``h2`` (gRPC).
"""

from __future__ import annotations

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)

from legation.certs.issuer import service_identity
from legation.config.extensions import RateLimitAction, service_blocks
from legation.config.model import Mesh
from legation.config.routes import Route
from legation.errors import ConfigError
from legation.extauthz import envoy_filter as authz_filter
from legation.extauthz.envoy_filter import FILTER_NAME as EXT_AUTHZ_FILTER_NAME
from legation.extauthz.jwt import METADATA_KEY as JWT_METADATA_KEY
from legation.extproc import envoy_filter as proc_filter
from legation.extproc.config import Chains
from legation.ratelimit import envoy_filter as rl_filter
from legation.translate._mtls import upstream_tls

EXTAUTHZ_CLUSTER = "legation|extauthz"
EXTPROC_CLUSTER = "legation|extproc"
RATELIMIT_CLUSTER = "legation|ratelimit"

EXTAUTHZ_FILTER = authz_filter.FILTER_NAME
EXTPROC_FILTER = proc_filter.FILTER_NAME
RATELIMIT_FILTER = rl_filter.RATE_LIMIT_FILTER


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def service_filters(mesh: Mesh) -> list[hcm_pb2.HttpFilter]:
    """The declared services' HTTP filters, in chain order (before the router)."""
    out = []
    if mesh.extauthz is not None:
        out.append(
            authz_filter.http_filter(
                EXTAUTHZ_CLUSTER,
                timeout_ms=_ms(mesh.extauthz.timeout.total_seconds()),
                failure_mode_allow=mesh.extauthz.fail_open,
            )
        )
    if mesh.extproc is not None:
        out.append(
            proc_filter.http_filter(
                EXTPROC_CLUSTER,
                message_timeout=mesh.extproc.timeout.total_seconds(),
                failure_mode_allow=mesh.extproc.fail_open,
            )
        )
    if mesh.ratelimit is not None:
        out.append(
            rl_filter.rate_limit_filter(
                domain=mesh.ratelimit.domain,
                cluster=RATELIMIT_CLUSTER,
                failure_mode="allow" if mesh.ratelimit.fail_open else "deny",
                timeout_ms=_ms(mesh.ratelimit.timeout.total_seconds()),
            )
        )
    return out


def service_clusters(mesh: Mesh) -> list[cluster_pb2.Cluster]:
    """A static HTTP/2 cluster per declared service (its address needs no EDS); mTLS when the
    service uses mesh TLS."""
    out = []
    if mesh.extauthz is not None:
        out.append(
            authz_filter.grpc_cluster(EXTAUTHZ_CLUSTER, [(mesh.extauthz.host, mesh.extauthz.port)])
        )
    if mesh.extproc is not None:
        out.append(proc_filter.grpc_cluster(EXTPROC_CLUSTER, mesh.extproc.host, mesh.extproc.port))
    if mesh.ratelimit is not None:
        rl = mesh.ratelimit
        out.append(rl_filter.rate_limit_cluster(RATELIMIT_CLUSTER, rl.host, rl.port))
    for cluster, (kind, block) in zip(out, service_blocks(mesh), strict=True):
        if block.mesh_tls(mtls_enabled=mesh.mtls.enabled):
            cluster.transport_socket.CopyFrom(
                upstream_tls(service_identity(mesh, kind), alpn=("h2",))
            )
    return out


def apply_services(
    mesh: Mesh, out: rc.Route, spec: Route | None, chains: Chains, *, index: int = -1
) -> None:
    """Set on ``out`` what each declared service does for mesh route ``spec`` (None: a default
    route, which asks for nothing). ``index`` is the route's position, for error messages."""
    if mesh.extauthz is not None:
        policy = spec.authz if spec is not None else None
        per_route = (
            authz_filter.per_route(policy=policy)
            if policy is not None and policy != "disabled"
            else authz_filter.per_route(disabled=True)
        )
        out.typed_per_filter_config[EXTAUTHZ_FILTER].Pack(per_route)
    if mesh.extproc is not None:
        chain = chains.get(spec.name) if spec is not None and spec.filters else None
        out.typed_per_filter_config[EXTPROC_FILTER].Pack(proc_filter.per_route(chain))
    if mesh.ratelimit is not None and spec is not None and spec.rate_limits:
        if not out.HasField("route"):
            raise ConfigError(
                f"routes[{index}].rate_limits: only applies to routes with 'to' or 'split'",
                code="invalid_config",
            )
        out.route.rate_limits.extend(
            rl_filter.route_rate_limits(*([_spec(a) for a in d.actions] for d in spec.rate_limits))
        )


def _spec(action: RateLimitAction) -> rl_filter.DescriptorSpec:
    if action.generic_key is not None:
        return rl_filter.GenericKey(action.generic_key.value, action.generic_key.key)
    if action.request_headers is not None:
        h = action.request_headers
        return rl_filter.RequestHeader(h.header, h.key, h.skip_if_absent)
    if action.jwt_claim is not None:
        # the ext_authz jwt check puts claims_to_metadata in the filter's dynamic metadata
        c = action.jwt_claim
        return rl_filter.Metadata(c.key or c.claim, EXT_AUTHZ_FILTER_NAME,
                                  (JWT_METADATA_KEY, c.claim), skip_if_absent=True)
    return rl_filter.RemoteAddress()
