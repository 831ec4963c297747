"""Envoy-side wiring for the HTTP call-out: ext_authz in HTTP mode, as protobufs.

* :func:`http_filter` -- the ``envoy.filters.http.ext_authz`` HttpFilter calling the fast-path
  server over HTTP/1.1, fail closed unless ``Callout.failure_mode_allow`` (an error or a
  timeout denies with ``status_on_error``), ``validate_mutations: true``.
* :func:`per_route` -- the route's ``ExtAuthzPerRoute``: the same ``http_service`` with the
  route's policy and checks in :data:`~legation.fastpath.contract.POLICY_HEADER` /
  :data:`~legation.fastpath.contract.CHECKS_HEADER` (``headers_to_add``; HTTP mode has no
  ``context_extensions``); ``disabled=True`` for routes that need no check.
* :func:`http_cluster` -- the STATIC HTTP/1.1 cluster pointing at the server.

Both take one :class:`Callout`, the settings the server must agree with (see
:mod:`legation.fastpath.contract`): build the server's ``Forwarded`` from the same
``upstream_headers``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2, http_uri_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.extensions.filters.http.ext_authz.v3 import ext_authz_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.type.matcher.v3 import string_pb2
from envoy.type.v3 import http_status_pb2
from google.protobuf import any_pb2

from legation._proto import address, milliseconds, pack
from legation._proto import http_filter as _http_filter
from legation.envoy_grpc import eject_dead_workers
from legation.fastpath.contract import (
    CHECKS_HEADER,
    HEADER_PREFIX,
    PATH_PREFIX,
    POLICY_HEADER,
    REMOTE_ADDRESS_HEADER,
    ROUTE_HEADER,
    Forwarded,
)

FILTER_NAME = "envoy.filters.http.ext_authz"


@dataclass(frozen=True, kw_only=True)
class Callout:
    """One HTTP call-out as Envoy sees it.

    ``allowed_headers``: request headers sent to the server besides Host, method, path,
    Content-Length and Authorization (which Envoy always sends); exact names, or prefixes ending
    in ``*`` (``x-tenant-*``). ``upstream_headers``: names a decision may add to the upstream
    request besides ``x-legation-*``; ``client_headers``: names a decision may add to the
    client's response when allowed (``response_headers_to_add``)."""

    cluster: str
    timeout_ms: int = 1000
    failure_mode_allow: bool = False  # True: Envoy lets the request through when the call fails
    status_on_error: int = 403
    allowed_headers: Sequence[str] = ()
    upstream_headers: Sequence[str] = ()
    client_headers: Sequence[str] = ()
    max_request_bytes: int = 0
    allow_partial_message: bool = True
    clear_route_cache: bool = False  # True: headers the answer sets make Envoy re-pick the route

    def forwarded(self) -> Forwarded:
        """The upstream header names the server may answer with (the server's side)."""
        return Forwarded(self.upstream_headers)


def _matchers(names: Sequence[str], *, what: str) -> list[string_pb2.StringMatcher]:
    out = []
    for raw in names:
        name = raw.lower()
        prefix = name.endswith("*")
        stem = name.rstrip("*")
        if not stem or any(c in stem for c in " \t\r\n:*"):
            raise ValueError(f"{what}: {raw!r} is not a header name or a 'prefix*'")
        out.append(
            string_pb2.StringMatcher(prefix=stem)
            if prefix
            else string_pb2.StringMatcher(exact=stem)
        )
    return out


def _request_matchers(names: Sequence[str]) -> list[string_pb2.StringMatcher]:
    """``allowed_headers``, refusing any that could pass a client's own ``x-legation-*``."""
    for raw in names:
        stem = raw.lower().rstrip("*")
        if stem.startswith(HEADER_PREFIX) or (raw.endswith("*") and HEADER_PREFIX.startswith(stem)):
            raise ValueError(
                f"allowed_headers: {raw!r} would let a client send Legation's own "
                f"{HEADER_PREFIX}* headers"
            )
    return _matchers(names, what="allowed_headers")


def http_service(
    callout: Callout,
    *,
    policy: str | None = None,
    checks: Sequence[str] = (),
    route: str | None = None,
    remote_address: bool = False,
) -> ext_authz_pb2.HttpService:
    """The ``http_service`` calling the server, with the route's policy and checks if any; for
    a fused ``route``, its name and, with ``remote_address``, the client address Envoy trusts
    (Envoy sets both: a client's own ``x-legation-*`` headers never reach the server)."""
    service = ext_authz_pb2.HttpService(
        server_uri=http_uri_pb2.HttpUri(
            uri=f"http://{callout.cluster}",
            cluster=callout.cluster,
            timeout=milliseconds(callout.timeout_ms),
        ),
        path_prefix=PATH_PREFIX,
    )
    add = service.authorization_request.headers_to_add
    if policy:
        add.append(base_pb2.HeaderValue(key=POLICY_HEADER, value=policy))
    if checks:
        add.append(base_pb2.HeaderValue(key=CHECKS_HEADER, value=",".join(checks)))
    if route is not None:
        add.append(base_pb2.HeaderValue(key=ROUTE_HEADER, value=route))
    if route is not None and remote_address:
        add.append(
            base_pb2.HeaderValue(
                key=REMOTE_ADDRESS_HEADER, value="%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%"
            )
        )
    response = service.authorization_response
    response.allowed_upstream_headers.patterns.append(
        string_pb2.StringMatcher(prefix=HEADER_PREFIX)
    )
    response.allowed_upstream_headers.patterns.extend(
        _matchers(callout.upstream_headers, what="upstream_headers")
    )
    if callout.client_headers:
        response.allowed_client_headers_on_success.patterns.extend(
            _matchers(callout.client_headers, what="client_headers")
        )
    return service


def http_filter(callout: Callout) -> hcm_pb2.HttpFilter:
    """The ext_authz filter in HTTP mode. ``max_request_bytes > 0`` sends up to that many body
    bytes; a larger body is cut (``allow_partial_message``) or refused 413."""
    config = ext_authz_pb2.ExtAuthz(
        transport_api_version=2,  # V3
        failure_mode_allow=callout.failure_mode_allow,
        validate_mutations=True,
        http_service=http_service(callout),
        clear_route_cache=callout.clear_route_cache,
    )
    if callout.allowed_headers:
        config.allowed_headers.patterns.extend(_request_matchers(callout.allowed_headers))
    config.status_on_error.code = http_status_pb2.StatusCode.Value(
        http_status_pb2.StatusCode.Name(callout.status_on_error)  # validates the status
    )
    if callout.max_request_bytes > 0:
        config.with_request_body.max_request_bytes = callout.max_request_bytes
        config.with_request_body.allow_partial_message = callout.allow_partial_message
    return _http_filter(FILTER_NAME, config)


def per_route(
    callout: Callout | None = None,
    *,
    policy: str | None = None,
    checks: Sequence[str] = (),
    route: str | None = None,
    remote_address: bool = False,
    disabled: bool = False,
) -> ext_authz_pb2.ExtAuthzPerRoute:
    """The route's settings: ``disabled``, or the call-out with its policy and checks (and, for a
    fused route, its name)."""
    if disabled:
        if policy or checks or route:
            raise ValueError("a route with ext_authz disabled cannot name a policy or checks")
        return ext_authz_pb2.ExtAuthzPerRoute(disabled=True)
    if callout is None:
        raise ValueError("a checked route needs the Callout its filter uses")
    out = ext_authz_pb2.ExtAuthzPerRoute()
    out.check_settings.http_service.CopyFrom(
        http_service(
            callout, policy=policy, checks=checks, route=route, remote_address=remote_address
        )
    )
    return out


def per_route_any(callout: Callout | None = None, **kwargs: object) -> any_pb2.Any:
    """:func:`per_route` packed for ``typed_per_filter_config[FILTER_NAME]``."""
    return pack(per_route(callout, **kwargs))  # type: ignore[arg-type]


def http_cluster(
    name: str, endpoints: Sequence[tuple[str, int]], *, connect_timeout_ms: int = 1000
) -> cluster_pb2.Cluster:
    """A STATIC HTTP/1.1 cluster (Envoy's default protocol) for the server's endpoints (a
    service's workers: one that refuses connections is ejected, as on the gRPC clusters)."""
    lb = [
        endpoint_components_pb2.LbEndpoint(
            endpoint=endpoint_components_pb2.Endpoint(address=address(host, port))
        )
        for host, port in endpoints
    ]
    cluster = cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.STATIC,
        connect_timeout=milliseconds(connect_timeout_ms),
        load_assignment=endpoint_pb2.ClusterLoadAssignment(
            cluster_name=name,
            endpoints=[endpoint_components_pb2.LocalityLbEndpoints(lb_endpoints=lb)],
        ),
    )
    if len(endpoints) > 1:
        eject_dead_workers(cluster.outlier_detection)
    return cluster
