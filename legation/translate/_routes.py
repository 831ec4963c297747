"""Mesh routes to Envoy routes: matches, actions, header changes and per-route policies.

A route's settings win over its service's defaults (``timeout``, ``retries``, ``fault``,
``mirror``); the "route's service" is the one service all its destinations belong to, if any.
Faults and local rate limits are per-route configs of HTTP filters every connection manager has
(:mod:`legation.translate._listeners`), so adding one is an RDS-only change.
"""

from __future__ import annotations

from envoy.config.core.v3 import base_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.common.fault.v3 import fault_pb2 as common_fault_pb2
from envoy.extensions.filters.http.fault.v3 import fault_pb2
from envoy.extensions.filters.http.local_ratelimit.v3 import local_rate_limit_pb2 as lrl_pb2
from envoy.type.matcher.v3 import regex_pb2, string_pb2
from envoy.type.v3 import http_status_pb2, percent_pb2, token_bucket_pb2
from google.protobuf import duration_pb2, wrappers_pb2

from legation._proto import duration, every_request, pack
from legation.config.model import Mesh, Service
from legation.config.policy import Fault, LocalRateLimit, Mirror, Retries
from legation.config.routes import HeaderChanges, Match, Route, ValueMatch
from legation.translate._names import (
    FAULT_FILTER,
    INBOUND,
    LOCAL_RATELIMIT_FILTER,
    inbound_cluster,
    outbound_cluster,
)

_REDIRECT_CODES = {
    301: rc.RedirectAction.MOVED_PERMANENTLY,
    302: rc.RedirectAction.FOUND,
    303: rc.RedirectAction.SEE_OTHER,
    307: rc.RedirectAction.TEMPORARY_REDIRECT,
    308: rc.RedirectAction.PERMANENT_REDIRECT,
}


def route(mesh: Mesh, spec: Route) -> rc.Route:
    """One Envoy route for a mesh route (the same on the gateway and in sidecars)."""
    service = _single_service(mesh, spec)
    out = rc.Route(name=spec.name, match=match(spec.match))
    if spec.redirect is not None:
        r = spec.redirect
        out.redirect.response_code = _REDIRECT_CODES[r.status]
        if r.scheme is not None:
            out.redirect.scheme_redirect = r.scheme
        if r.host is not None:
            out.redirect.host_redirect = r.host
        if r.port is not None:
            out.redirect.port_redirect = r.port
        if r.path is not None:
            out.redirect.path_redirect = r.path
        elif r.prefix is not None:
            out.redirect.prefix_rewrite = r.prefix
    elif spec.direct_response is not None:
        d = spec.direct_response
        out.direct_response.status = d.status
        if d.body is not None:
            out.direct_response.body.inline_string = d.body
    else:
        out.route.CopyFrom(_forward(spec, service))
    _headers(out, spec)
    fault = spec.fault or (service.fault if service else None)
    if fault is not None:
        out.typed_per_filter_config[FAULT_FILTER].CopyFrom(pack(http_fault(fault)))
    if spec.local_rate_limit is not None:
        limit = local_rate_limit(spec.local_rate_limit, stat_prefix=f"route_{spec.name}")
        out.typed_per_filter_config[LOCAL_RATELIMIT_FILTER].CopyFrom(pack(limit))
    return out


def default_route(service: Service) -> rc.Route:
    """Inside the mesh, after a service's own routes: everything else to the whole service."""
    spec = Route.model_validate({"name": "default", "to": {"service": service.name}})
    out = rc.Route(
        name=f"{service.name}-default", match=match(spec.match), route=_forward(spec, service)
    )
    if service.fault is not None:
        out.typed_per_filter_config[FAULT_FILTER].CopyFrom(pack(http_fault(service.fault)))
    return out


def _single_service(mesh: Mesh, spec: Route) -> Service | None:
    names = {d.service for d in spec.destinations()}
    return mesh.service(names.pop()) if len(names) == 1 else None


def _forward(spec: Route, service: Service | None) -> rc.RouteAction:
    action = rc.RouteAction()
    if spec.to is not None:
        action.cluster = outbound_cluster(spec.to.service, spec.to.subset)
    else:
        action.weighted_clusters.CopyFrom(
            rc.WeightedCluster(
                clusters=[
                    rc.WeightedCluster.ClusterWeight(
                        name=outbound_cluster(d.service, d.subset),
                        weight=wrappers_pb2.UInt32Value(value=d.weight),
                    )
                    for d in spec.split or []
                ]
            )
        )
    timeout = spec.timeout or (service.timeout if service else None)
    if timeout is not None:
        action.timeout.CopyFrom(duration(timeout))
    retries = spec.retries or (service.retries if service else None)
    if retries is not None:
        action.retry_policy.CopyFrom(retry_policy(retries))
    mirror = spec.mirror or (service.mirror if service else None)
    if mirror is not None:
        action.request_mirror_policies.append(mirror_policy(mirror))
    if spec.rewrite is not None and spec.rewrite.prefix is not None:
        action.prefix_rewrite = spec.rewrite.prefix
    if spec.rewrite is not None and spec.rewrite.host is not None:
        action.host_rewrite_literal = spec.rewrite.host
    if service is not None and service.load_balancer.hash_header:
        action.hash_policy.append(
            rc.RouteAction.HashPolicy(
                header=rc.RouteAction.HashPolicy.Header(
                    header_name=service.load_balancer.hash_header
                )
            )
        )
    return action


def match(spec: Match) -> rc.RouteMatch:
    out = rc.RouteMatch()
    path = spec.path
    if path.prefix is not None:
        out.prefix = path.prefix
    elif path.exact is not None:
        out.path = path.exact
    else:
        out.safe_regex.CopyFrom(regex_pb2.RegexMatcher(regex=path.regex or ""))
    for h in spec.headers:
        out.headers.append(_header_matcher(h))
    for q in spec.query:
        qm = rc.QueryParameterMatcher(name=q.name)
        if q.present is not None:
            qm.present_match = q.present
        else:
            qm.string_match.CopyFrom(_string_matcher(q))
        out.query_parameters.append(qm)
    if spec.methods:
        method = string_pb2.StringMatcher()
        if len(spec.methods) == 1:
            method.exact = spec.methods[0]
        else:
            method.safe_regex.regex = "^(" + "|".join(spec.methods) + ")$"
        out.headers.append(rc.HeaderMatcher(name=":method", string_match=method))
    return out


def _header_matcher(spec: ValueMatch) -> rc.HeaderMatcher:
    out = rc.HeaderMatcher(name=spec.name, invert_match=spec.invert)
    if spec.present is not None:
        out.present_match = spec.present
    else:
        out.string_match.CopyFrom(_string_matcher(spec))
    return out


def _string_matcher(spec: ValueMatch) -> string_pb2.StringMatcher:
    if spec.exact is not None:
        return string_pb2.StringMatcher(exact=spec.exact)
    if spec.prefix is not None:
        return string_pb2.StringMatcher(prefix=spec.prefix)
    return string_pb2.StringMatcher(safe_regex=regex_pb2.RegexMatcher(regex=spec.regex or ""))


def retry_policy(spec: Retries) -> rc.RetryPolicy:
    out = rc.RetryPolicy(
        retry_on=",".join(spec.retry_on),
        num_retries=wrappers_pb2.UInt32Value(value=spec.attempts),
        retriable_status_codes=spec.retriable_status_codes,
    )
    if spec.per_try_timeout is not None:
        out.per_try_timeout.CopyFrom(duration(spec.per_try_timeout))
    return out


def mirror_policy(spec: Mirror) -> rc.RouteAction.RequestMirrorPolicy:
    return rc.RouteAction.RequestMirrorPolicy(
        cluster=outbound_cluster(spec.service, spec.subset),
        runtime_fraction=base_pb2.RuntimeFractionalPercent(default_value=fraction(spec.percent)),
    )


def http_fault(spec: Fault) -> fault_pb2.HTTPFault:
    out = fault_pb2.HTTPFault()
    if spec.delay is not None:
        out.delay.CopyFrom(
            common_fault_pb2.FaultDelay(
                fixed_delay=duration(spec.delay.duration), percentage=fraction(spec.delay.percent)
            )
        )
    if spec.abort is not None:
        out.abort.CopyFrom(
            fault_pb2.FaultAbort(
                http_status=spec.abort.status, percentage=fraction(spec.abort.percent)
            )
        )
    return out


def local_rate_limit(spec: LocalRateLimit, *, stat_prefix: str) -> lrl_pb2.LocalRateLimit:
    everyone = every_request()
    return lrl_pb2.LocalRateLimit(
        stat_prefix=stat_prefix,
        status=http_status_pb2.HttpStatus(code=spec.status),
        token_bucket=token_bucket_pb2.TokenBucket(
            max_tokens=spec.burst or spec.requests,
            tokens_per_fill=wrappers_pb2.UInt32Value(value=spec.requests),
            fill_interval=duration(spec.per),
        ),
        filter_enabled=everyone,
        filter_enforced=everyone,
    )


def fraction(percent: float) -> percent_pb2.FractionalPercent:
    """A percentage as parts per million (so 0.1% survives)."""
    return percent_pb2.FractionalPercent(
        numerator=round(percent * 10_000), denominator=percent_pb2.FractionalPercent.MILLION
    )


def _headers(out: rc.Route, spec: Route) -> None:
    req, resp = spec.headers.request, spec.headers.response
    out.request_headers_to_add.extend(_header_options(req))
    out.request_headers_to_remove.extend(req.remove)
    out.response_headers_to_add.extend(_header_options(resp))
    out.response_headers_to_remove.extend(resp.remove)


def _header_options(changes: HeaderChanges) -> list[base_pb2.HeaderValueOption]:
    append = base_pb2.HeaderValueOption.APPEND_IF_EXISTS_OR_ADD
    overwrite = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
    return [
        base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=k, value=v), append_action=a)
        for items, a in ((changes.add, append), (changes.set, overwrite))
        for k, v in items.items()
    ]


def inbound_routes(service: Service) -> route_pb2.RouteConfiguration:
    """Everything to the local app. No timeout here (the caller's side owns it)."""
    to_app = rc.Route(
        name=f"inbound-{service.name}",
        match=rc.RouteMatch(prefix="/"),
        route=rc.RouteAction(
            cluster=inbound_cluster(service.name), timeout=duration_pb2.Duration(seconds=0)
        ),
    )
    if service.local_rate_limit is not None:
        limit = local_rate_limit(service.local_rate_limit, stat_prefix=f"inbound_{service.name}")
        to_app.typed_per_filter_config[LOCAL_RATELIMIT_FILTER].CopyFrom(pack(limit))
    return route_pb2.RouteConfiguration(
        name=INBOUND,
        virtual_hosts=[rc.VirtualHost(name=INBOUND, domains=["*"], routes=[to_app])],
    )
