"""Envoy-side wiring for the HTTP call-out: ext_authz in HTTP mode, as protobufs.

* :func:`http_filter` -- the ``envoy.filters.http.ext_authz`` HttpFilter calling the fast-path
  server over HTTP/1.1, fail closed unless ``Callout.failure_mode_allow`` (an error or a
  timeout denies with ``status_on_error``), ``validate_mutations: true``.
* :func:`configure_route` -- a route's setting: ``disabled``, or checked with its policy,
  checks and (fused) name in the route's metadata, which the filter's ``http_service`` sends in
  :data:`~legation.fastpath.contract.POLICY_HEADER`, :data:`~legation.fastpath.contract.
  CHECKS_HEADER` and :data:`~legation.fastpath.contract.ROUTE_HEADER` (``headers_to_add``
  reading ``%METADATA(ROUTE:...)%``; HTTP mode has no ``context_extensions``).
  :func:`route_dict` does the same for a route written as a dict.
* :func:`http_cluster` -- the STATIC HTTP/1.1 cluster pointing at the server.

The filter is built from one :class:`Callout`, the settings the server must agree with (see
:mod:`legation.fastpath.contract`): build the server's ``Forwarded`` from the same
``upstream_headers``. A route's setting names the filter by its ``Callout.name``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2, http_uri_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.extensions.filters.http.ext_authz.v3 import ext_authz_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.type.matcher.v3 import string_pb2
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2
from google.protobuf.json_format import MessageToJson

from legation._proto import address, milliseconds, pipe
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
    remote_address: bool = False  # True: send the client address Envoy trusts (fused routes)
    name: str = FILTER_NAME
    """The filter's name in the chain, and the route-metadata namespace its routes' settings
    are read from (:func:`configure_route`)."""

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


ROUTE_SETTINGS = {"policy": POLICY_HEADER, "checks": CHECKS_HEADER, "route": ROUTE_HEADER}
"""Route metadata key -> the header Envoy sets from it on the call (:func:`http_service`)."""


def http_service(callout: Callout) -> ext_authz_pb2.HttpService:
    """The filter's ``http_service``: calling the server, each route's policy, checks and (fused)
    name read from the route's metadata under ``callout.name`` (:func:`configure_route`) into
    :data:`ROUTE_SETTINGS`' headers, and with ``callout.remote_address`` the client address
    Envoy trusts. Envoy *sets* these (a client's own ``x-legation-*`` never reaches the
    server); a key the route lacks sends no header.

    One service for every route, not a per-route ``http_service`` override: with an override
    Envoy builds the call's client per request (measured: bench/README, "route settings as
    route metadata")."""
    service = ext_authz_pb2.HttpService(
        server_uri=http_uri_pb2.HttpUri(
            uri=f"http://{callout.cluster}",
            cluster=callout.cluster,
            timeout=milliseconds(callout.timeout_ms),
        ),
        path_prefix=PATH_PREFIX,
    )
    add = service.authorization_request.headers_to_add
    for key, header in ROUTE_SETTINGS.items():
        add.append(
            base_pb2.HeaderValue(key=header, value=f"%METADATA(ROUTE:{callout.name}:{key})%")
        )
    if callout.remote_address:
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
    return _http_filter(callout.name, config)


def per_route(*, disabled: bool = False) -> ext_authz_pb2.ExtAuthzPerRoute:
    """The route's ``ExtAuthzPerRoute``: ``disabled``, or checked with the filter's settings
    (its policy and checks travel in the route's metadata: :func:`configure_route`)."""
    out = ext_authz_pb2.ExtAuthzPerRoute()
    if disabled:
        out.disabled = True
    else:
        out.check_settings.SetInParent()
    return out


def route_metadata(
    *, policy: str | None = None, checks: Sequence[str] = (), route: str | None = None
) -> struct_pb2.Struct:
    """A checked route's settings for its filter to send: its policy, checks and, for a fused
    route, its name. Each becomes a header value, so a control character or an outer blank in
    one, or a ``,`` in a check name, is a ValueError naming the setting."""
    for name in checks:
        if not name or "," in name:
            raise ValueError(f"checks: {name!r} is not a check name")
    values = {"policy": policy, "checks": ",".join(checks) or None, "route": route}
    out = struct_pb2.Struct()
    for key, value in values.items():
        if value is None:
            continue
        if not value or value != value.strip(" \t") or any(c < " " or c == "\x7f" for c in value):
            raise ValueError(f"{key}: {value!r} cannot be a header value")
        out.fields[key].string_value = value
    return out


def configure_route(
    out: rc.Route,
    name: str,
    *,
    policy: str | None = None,
    checks: Sequence[str] = (),
    route: str | None = None,
    disabled: bool = False,
) -> None:
    """``out``'s setting for the call-out filter called ``name`` (its :attr:`Callout.name`):
    ``disabled``, or checked with the route's ``policy``, ``checks`` and (fused) ``route`` name
    in its metadata under ``name``."""
    if disabled and (policy or checks or route):
        raise ValueError("a route with ext_authz disabled cannot name a policy or checks")
    settings = route_metadata(policy=policy, checks=checks, route=route)
    out.typed_per_filter_config[name].Pack(per_route(disabled=disabled))
    if settings.fields:
        out.metadata.filter_metadata[name].CopyFrom(settings)
    elif name in out.metadata.filter_metadata:  # none: nothing earlier stays either
        del out.metadata.filter_metadata[name]


def route_dict(entry: dict[str, Any], name: str, /, **kwargs: Any) -> dict[str, Any]:
    """:func:`configure_route` for a route written as a plain dict (a static bootstrap's): a
    copy of ``entry`` with the filter's per-route setting and metadata merged in."""
    built = rc.Route()
    configure_route(built, name, **kwargs)
    plain = json.loads(MessageToJson(built, preserving_proto_field_name=True))  # plain dicts
    out = dict(entry)
    out["typed_per_filter_config"] = {
        **entry.get("typed_per_filter_config", {}),
        **plain["typed_per_filter_config"],
    }
    old = entry.get("metadata", {})
    kept = {k: v for k, v in old.get("filter_metadata", {}).items() if k != name}
    settings = plain.get("metadata", {}).get("filter_metadata", {})
    metadata = {k: v for k, v in old.items() if k != "filter_metadata"}
    if kept or settings:
        metadata["filter_metadata"] = {**kept, **settings}
    out.pop("metadata", None)
    if metadata:
        out["metadata"] = metadata
    return out


def http_cluster(
    name: str, endpoints: Sequence[tuple[str, int] | str], *, connect_timeout_ms: int = 1000
) -> cluster_pb2.Cluster:
    """A STATIC HTTP/1.1 cluster (Envoy's default protocol) for the server's endpoints, each a
    (host, port) or a Unix socket's path (a service's workers: one that refuses connections is
    ejected, as on the gRPC clusters)."""
    lb = [
        endpoint_components_pb2.LbEndpoint(
            endpoint=endpoint_components_pb2.Endpoint(
                address=pipe(e) if isinstance(e, str) else address(*e)
            )
        )
        for e in endpoints
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
