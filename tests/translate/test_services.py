"""translate() with request-path services: filters, clusters and per-route config as protobufs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2, config_source_pb2, grpc_service_pb2
from envoy.config.ratelimit.v3 import rls_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.extensions.filters.http.ext_authz.v3 import ext_authz_pb2
from envoy.extensions.filters.http.ext_proc.v3 import ext_proc_pb2, processing_mode_pb2
from envoy.extensions.filters.http.ratelimit.v3 import rate_limit_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2, tls_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from envoy.type.matcher.v3 import string_pb2
from google.protobuf import duration_pb2, wrappers_pb2
from google.protobuf.json_format import MessageToDict

from legation.certs import MeshIssuer
from legation.errors import ConfigError
from legation.translate import translate
from legation.xds.snapshot import Snapshot
from legation.xds.types import ResourceType
from tests.config.meshdata import base, parse
from tests.translate.test_mesh import hcm_of, message

AUTHZ = "envoy.filters.http.ext_authz"
PROC = "envoy.filters.http.ext_proc"
RL = "envoy.filters.http.ratelimit"
_PM = processing_mode_pb2.ProcessingMode


def with_services(**blocks: Any) -> dict[str, Any]:
    data = base()
    data["extauthz"] = {"port": 18010, "embedded": False}
    data["extproc"] = {"port": 18011, "embedded": False}
    data["ratelimit"] = {"port": 18012, "embedded": False}
    for name, block in blocks.items():
        data[name] = {**data[name], **block}
    data["routes"] = [
        {
            "name": "guarded",
            "gateway": True,
            "mesh_hosts": ["reviews"],
            "match": {"path": {"prefix": "/admin"}},
            "to": {"service": "reviews"},
            "authz": "quickstart.authz",
            "filters": [
                {
                    "name": "header_route",
                    "options": {
                        "header": "x-cohort",
                        "rules": [{"header": "x-user", "one_of": ["alice"], "value": "beta"}],
                    },
                }
            ],
            "rate_limits": [
                {
                    "actions": [
                        {"generic_key": {"value": "admin"}},
                        {"request_headers": {"header": "x-user", "key": "user"}},
                    ]
                },
                {"actions": [{"remote_address": {}}]},
            ],
        },
        {"name": "open", "to": {"service": "ratings"}},
    ]
    return data


def snaps(data: dict[str, Any]) -> dict[str, Snapshot]:
    return translate(parse(data), version="v1")


def routes_of(snap: Snapshot, config: str) -> dict[str, rc.Route]:
    rcfg = message(snap, ResourceType.ROUTE, config)
    return {r.name: r for vh in rcfg.virtual_hosts for r in vh.routes}


def per_route(route: rc.Route, name: str, kind: Any) -> Any:
    out = kind()
    assert route.typed_per_filter_config[name].Unpack(out)
    return out


def test_filters_before_the_router_in_order_on_gateway_and_outbound_not_inbound() -> None:
    out = snaps(with_services())
    expected = [
        "envoy.filters.http.fault",
        "envoy.filters.http.local_ratelimit",
        AUTHZ,
        PROC,
        RL,
        "envoy.filters.http.router",
    ]
    gw = hcm_of(message(out["gateway-ingress"], ResourceType.LISTENER, "gateway"))
    assert [f.name for f in gw.http_filters] == expected
    sidecar = out["sidecar-reviews-0"]
    outbound = hcm_of(message(sidecar, ResourceType.LISTENER, "outbound"))
    assert [f.name for f in outbound.http_filters] == expected
    inbound = hcm_of(message(sidecar, ResourceType.LISTENER, "inbound"))
    assert AUTHZ not in [f.name for f in inbound.http_filters]
    assert not any(
        r.typed_per_filter_config
        for r in routes_of(sidecar, "inbound").values()
        if AUTHZ in r.typed_per_filter_config
    )


def test_no_service_block_no_filter_and_no_cluster() -> None:
    data = base()
    out = snaps(data)["gateway-ingress"]
    names = [f.name for f in hcm_of(message(out, ResourceType.LISTENER, "gateway")).http_filters]
    assert not {AUTHZ, PROC, RL} & set(names)
    assert not [c for c in out.resources(ResourceType.CLUSTER) if c.startswith("legation|")]


def test_fail_closed_defaults_follow_each_block() -> None:
    gw = hcm_of(
        message(snaps(with_services())["gateway-ingress"], ResourceType.LISTENER, "gateway")
    )
    filters = {f.name: f for f in gw.http_filters}
    authz = ext_authz_pb2.ExtAuthz()
    filters[AUTHZ].typed_config.Unpack(authz)
    expected = ext_authz_pb2.ExtAuthz(
        transport_api_version=config_source_pb2.V3,
        failure_mode_allow=False,
        validate_mutations=True,
    )  # header CR/LF/NUL refused
    expected.grpc_service.envoy_grpc.cluster_name = "legation|extauthz"
    expected.grpc_service.timeout.FromMilliseconds(250)
    expected.status_on_error.code = 403
    assert authz == expected

    proc = ext_proc_pb2.ExternalProcessor()
    filters[PROC].typed_config.Unpack(proc)
    assert proc.failure_mode_allow is False
    assert proc.grpc_service.envoy_grpc.cluster_name == "legation|extproc"
    assert proc.message_timeout == duration_pb2.Duration(nanos=200_000_000)

    limit = rate_limit_pb2.RateLimit()
    filters[RL].typed_config.Unpack(limit)
    expected_rl = rate_limit_pb2.RateLimit(
        domain="mesh",
        failure_mode_deny=False,  # rate limiting defaults to open
        timeout=duration_pb2.Duration(nanos=250_000_000),
        enable_x_ratelimit_headers=rate_limit_pb2.RateLimit.DRAFT_VERSION_03,
        rate_limit_service=rls_pb2.RateLimitServiceConfig(
            grpc_service=grpc_service_pb2.GrpcService(
                envoy_grpc=grpc_service_pb2.GrpcService.EnvoyGrpc(cluster_name="legation|ratelimit")
            ),
            transport_api_version=config_source_pb2.V3,
        ),
    )
    assert limit == expected_rl


def test_failure_modes_flip_with_the_blocks() -> None:
    data = with_services(
        extauthz={"failure_mode": "open", "timeout": "1s"},
        extproc={"failure_mode": "open"},
        ratelimit={"failure_mode": "closed", "domain": "edge"},
    )
    out = snaps(data)["gateway-ingress"]
    filters = {
        f.name: f for f in hcm_of(message(out, ResourceType.LISTENER, "gateway")).http_filters
    }
    authz, proc, limit = (
        ext_authz_pb2.ExtAuthz(),
        ext_proc_pb2.ExternalProcessor(),
        rate_limit_pb2.RateLimit(),
    )
    filters[AUTHZ].typed_config.Unpack(authz)
    filters[PROC].typed_config.Unpack(proc)
    filters[RL].typed_config.Unpack(limit)
    assert authz.failure_mode_allow and authz.grpc_service.timeout.seconds == 1
    assert proc.failure_mode_allow
    assert limit.failure_mode_deny and limit.domain == "edge"
    guarded = routes_of(out, "gateway")["guarded"]
    overrides = per_route(guarded, PROC, ext_proc_pb2.ExtProcPerRoute).overrides
    assert overrides.failure_mode_allow.value is True


def test_static_http2_clusters_at_the_declared_addresses() -> None:
    data = with_services(extauthz={"host": "10.0.0.5"})
    out = snaps(data)
    for node, snap in out.items():
        clusters = snap.resources(ResourceType.CLUSTER)
        for name, port in (
            ("legation|extauthz", 18010),
            ("legation|extproc", 18011),
            ("legation|ratelimit", 18012),
        ):
            cluster = clusters[name].message
            address = cluster.load_assignment.endpoints[0].lb_endpoints[0].endpoint.address
            assert address.socket_address.port_value == port, node
            options = http_protocol_options_pb2.HttpProtocolOptions()
            cluster.typed_extension_protocol_options[
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
            ].Unpack(options)
            assert options.explicit_http_config.HasField("http2_protocol_options")
        authz = clusters["legation|extauthz"].message
        host = authz.load_assignment.endpoints[0].lb_endpoints[0].endpoint.address
        assert host.socket_address.address == "10.0.0.5"
        snap.check_consistent()


def test_one_endpoint_per_worker_and_dead_ones_ejected() -> None:
    data = with_services(extauthz={"workers": 3}, extproc={"workers": 1})
    clusters = snaps(data)["gateway-ingress"].resources(ResourceType.CLUSTER)

    def ports(name: str) -> list[int]:
        lb = clusters[name].message.load_assignment.endpoints[0].lb_endpoints
        return [e.endpoint.address.socket_address.port_value for e in lb]

    assert ports("legation|extauthz") == [18010, 18110, 18210]  # worker i on port + 100 i
    assert ports("legation|extproc") == [18011]
    assert ports("legation|ratelimit") == [18012]  # embedded: false runs elsewhere: 1
    detection = clusters["legation|extauthz"].message.outlier_detection
    assert detection.split_external_local_origin_errors
    assert detection.consecutive_local_origin_failure.value == 1
    assert detection.enforcing_consecutive_5xx.value == 0  # an answer never ejects a worker
    assert detection.max_ejection_percent.value == 50
    assert not clusters["legation|extproc"].message.HasField("outlier_detection")


def test_the_http_callout_has_one_endpoint_per_worker_too() -> None:
    from legation.translate._authz import EXTAUTHZ_HTTP_CLUSTER

    data = with_services(extauthz={"workers": 2, "protocol": "http", "http_port": 18020})
    clusters = snaps(data)["gateway-ingress"].resources(ResourceType.CLUSTER)
    http = clusters[EXTAUTHZ_HTTP_CLUSTER].message
    lb = http.load_assignment.endpoints[0].lb_endpoints
    assert [e.endpoint.address.socket_address.port_value for e in lb] == [18020, 18120]
    assert http.outlier_detection.consecutive_local_origin_failure.value == 1


def test_route_with_policy_filters_and_limits() -> None:
    out = snaps(with_services())
    for snap, config in (
        (out["gateway-ingress"], "gateway"),
        (out["sidecar-reviews-0"], "outbound"),
    ):
        guarded = routes_of(snap, config)["guarded"]
        expected_authz = ext_authz_pb2.ExtAuthzPerRoute()
        expected_authz.check_settings.context_extensions["policy"] = "quickstart.authz"
        assert per_route(guarded, AUTHZ, ext_authz_pb2.ExtAuthzPerRoute) == expected_authz

        expected_proc = ext_proc_pb2.ExtProcPerRoute(
            overrides=ext_proc_pb2.ExtProcOverrides(
                processing_mode=_PM(
                    request_header_mode=_PM.SEND,
                    response_header_mode=_PM.SKIP,
                    request_trailer_mode=_PM.SKIP,
                    response_trailer_mode=_PM.SKIP,
                ),
                grpc_initial_metadata=[
                    base_pb2.HeaderValue(key="x-legation-chain", value="guarded")
                ],
                failure_mode_allow=wrappers_pb2.BoolValue(value=False),
            )
        )
        assert per_route(guarded, PROC, ext_proc_pb2.ExtProcPerRoute) == expected_proc

        first = rc.RateLimit(
            actions=[
                rc.RateLimit.Action(
                    generic_key=rc.RateLimit.Action.GenericKey(
                        descriptor_value="admin", descriptor_key="generic_key"
                    )
                ),
                rc.RateLimit.Action(
                    request_headers=rc.RateLimit.Action.RequestHeaders(
                        header_name="x-user", descriptor_key="user"
                    )
                ),
            ]
        )
        second = rc.RateLimit(
            actions=[rc.RateLimit.Action(remote_address=rc.RateLimit.Action.RemoteAddress())]
        )
        assert list(guarded.route.rate_limits) == [first, second]


def test_routes_that_ask_for_nothing_make_no_call_out() -> None:
    out = snaps(with_services())
    gw_routes = routes_of(out["gateway-ingress"], "gateway")
    sidecar_routes = routes_of(out["sidecar-reviews-1"], "outbound")
    for route in (
        gw_routes["open"],
        sidecar_routes["reviews-default"],
        sidecar_routes["ratings-default"],
    ):
        assert per_route(
            route, AUTHZ, ext_authz_pb2.ExtAuthzPerRoute
        ) == ext_authz_pb2.ExtAuthzPerRoute(disabled=True)
        assert per_route(route, PROC, ext_proc_pb2.ExtProcPerRoute) == ext_proc_pb2.ExtProcPerRoute(
            disabled=True
        )
        assert not route.route.rate_limits


def test_authz_disabled_is_disabled() -> None:
    data = with_services()
    data["routes"][1]["authz"] = "disabled"
    route = routes_of(snaps(data)["gateway-ingress"], "gateway")["open"]
    assert per_route(route, AUTHZ, ext_authz_pb2.ExtAuthzPerRoute).disabled


def test_response_phase_filter_asks_for_response_headers() -> None:
    data = with_services()
    data["routes"][1]["filters"] = [
        {"name": "headers", "options": {"response": {"set": {"x-served-by": "legation"}}}}
    ]
    route = routes_of(snaps(data)["gateway-ingress"], "gateway")["open"]
    mode = per_route(route, PROC, ext_proc_pb2.ExtProcPerRoute).overrides.processing_mode
    assert (mode.request_header_mode, mode.response_header_mode) == (_PM.SKIP, _PM.SEND)


def test_rate_limits_on_a_direct_response_are_refused() -> None:
    data = with_services()
    data["routes"][1] = {
        "name": "hello",
        "direct_response": {"status": 200},
        "rate_limits": [{"actions": [{"remote_address": {}}]}],
    }
    with pytest.raises(
        ConfigError,
        match=r"routes\[1\]\.rate_limits: only applies to routes "
        r"with 'to' or 'split'",
    ):
        snaps(data)


def test_deterministic_with_services() -> None:
    mesh = parse(with_services())
    first, second = translate(mesh, version="v1"), translate(mesh, version="v1")
    for node, snap in first.items():
        for rtype in ResourceType:
            assert snap.version(rtype) == second[node].version(rtype)


# -- mesh mTLS to the services ---------------------------------------------------------------

SERVICE_CLUSTERS = {
    "extauthz": "legation|extauthz",
    "extproc": "legation|extproc",
    "ratelimit": "legation|ratelimit",
}


def expected_service_tls(server_id: str, alpn: str = "h2") -> base_pb2.TransportSocket:
    """Written out field by field: the proxy's certificate and the trust bundle over ADS (SDS),
    the server's URI SAN pinned, ALPN h2 (http/1.1 to the HTTP call-out)."""
    ads = config_source_pb2.ConfigSource(
        ads=config_source_pb2.AggregatedConfigSource(),
        resource_api_version=config_source_pb2.V3,
    )
    context = tls_pb2.UpstreamTlsContext(
        common_tls_context=tls_pb2.CommonTlsContext(
            alpn_protocols=[alpn],
            tls_certificate_sds_secret_configs=[
                secret_pb2.SdsSecretConfig(name="legation-workload-cert", sds_config=ads)
            ],
            combined_validation_context=tls_pb2.CommonTlsContext.CombinedCertificateValidationContext(
                default_validation_context=common_pb2.CertificateValidationContext(
                    match_typed_subject_alt_names=[
                        common_pb2.SubjectAltNameMatcher(
                            san_type=common_pb2.SubjectAltNameMatcher.URI,
                            matcher=string_pb2.StringMatcher(exact=server_id),
                        )
                    ]
                ),
                validation_context_sds_secret_config=secret_pb2.SdsSecretConfig(
                    name="legation-trust-bundle", sds_config=ads
                ),
            ),
        ),
    )
    socket = base_pb2.TransportSocket(name="envoy.transport_sockets.tls")
    socket.typed_config.Pack(context)
    return socket


def service_cluster(snap: Snapshot, kind: str) -> cluster_pb2.Cluster:
    cluster: cluster_pb2.Cluster = snap.resources(ResourceType.CLUSTER)[
        SERVICE_CLUSTERS[kind]
    ].message
    return cluster


def with_mtls(mode: str, **blocks: Any) -> dict[str, Any]:
    data = with_services(**blocks)
    data["mtls"] = {"mode": mode, "trust_domain": "example.org", "namespace": "shop"}
    return data


@pytest.mark.parametrize("mode", ["strict", "permissive"])
def test_with_mtls_every_proxy_calls_the_services_over_mtls_pinning_their_identity(
    mode: str,
) -> None:
    out = snaps(with_mtls(mode))
    for node in ("gateway-ingress", "sidecar-reviews-0"):
        for kind in SERVICE_CLUSTERS:
            cluster = service_cluster(out[node], kind)
            assert cluster.transport_socket == expected_service_tls(
                f"spiffe://example.org/ns/shop/sa/legation-{kind}"
            ), (node, kind)
            assert not cluster.transport_socket_matches


def test_without_mtls_the_service_clusters_stay_plaintext() -> None:
    out = snaps(with_services())
    for kind in SERVICE_CLUSTERS:
        cluster = service_cluster(out["gateway-ingress"], kind)
        assert not cluster.HasField("transport_socket")
        assert not cluster.transport_socket_matches


def test_a_block_with_tls_none_stays_plaintext_in_an_mtls_mesh() -> None:
    out = snaps(with_mtls("strict", ratelimit={"tls": "none"}))["gateway-ingress"]
    assert not service_cluster(out, "ratelimit").HasField("transport_socket")
    assert service_cluster(out, "extauthz").HasField("transport_socket")
    assert service_cluster(out, "extproc").HasField("transport_socket")


def test_service_tls_names_only_secrets_every_proxy_is_sent(tmp_path: Path) -> None:
    """With the proxies' certificates, the SDS consistency check passes for every snapshot."""
    mesh = parse(with_mtls("strict"))
    issuer = MeshIssuer(mesh_dir=tmp_path, default_ca_dir=tmp_path / "ca")
    issuer.update(mesh)
    out = translate(mesh, version="v1", secrets=issuer.secrets())  # raises when one is missing
    assert {n for n, s in out.items() if s.resources(ResourceType.SECRET)} == set(out)


# -- ext_authz over HTTP (extauthz.protocol: http) ---------------------------------------------

HTTP_AUTHZ = "legation.ext_authz.http"
HTTP_BLOCK = {
    "protocol": "http",
    "http_port": 18020,
    "http_headers": {"request": ["x-tenant"], "upstream": ["x-user"], "client": ["x-cache"]},
}


def all_resources(out: dict[str, Snapshot]) -> dict[tuple[str, str, str], bytes]:
    return {
        (node, rtype.short, name): res.data
        for node, snap in out.items()
        for rtype in ResourceType
        for name, res in snap.resources(rtype).items()
    }


@pytest.mark.parametrize("mtls", ["off", "strict"])
def test_protocol_grpc_or_absent_is_todays_config_byte_for_byte(mtls: str) -> None:
    absent = with_services()
    explicit = with_services(extauthz={"protocol": "grpc"})
    jwt = {"actions": [{"jwt_claim": {"claim": "sub"}}]}
    for data in (absent, explicit):
        data["mtls"] = {"mode": mtls, "ca_dir": "ca"}
        data["routes"].append(
            {
                "name": "pinned",
                "to": {"service": "ratings"},
                "authz": "a.b",
                "authz_protocol": "grpc",
                "rate_limits": [jwt],
            }
        )
    assert "protocol" not in absent["extauthz"]
    assert all_resources(snaps(absent)) == all_resources(snaps(explicit))
    names = {name for (_, _, name) in all_resources(snaps(absent))}
    assert "legation|extauthz-http" not in names


def http_mesh(*routes: dict[str, Any]) -> dict[str, Any]:
    data = with_services(extauthz=HTTP_BLOCK)
    data["routes"].extend(routes)
    return data


def test_http_protocol_adds_the_http_filter_after_the_grpc_one_and_its_cluster() -> None:
    out = snaps(http_mesh())["gateway-ingress"]
    gw = hcm_of(message(out, ResourceType.LISTENER, "gateway"))
    names = [f.name for f in gw.http_filters]
    assert names[names.index(AUTHZ) : names.index(PROC)] == [AUTHZ, HTTP_AUTHZ]
    http = ext_authz_pb2.ExtAuthz()
    next(f for f in gw.http_filters if f.name == HTTP_AUTHZ).typed_config.Unpack(http)
    assert http.http_service.server_uri.cluster == "legation|extauthz-http"
    assert http.http_service.path_prefix == "/legation/check"
    assert http.failure_mode_allow is False
    assert [m.exact for m in http.allowed_headers.patterns] == ["x-tenant"]
    allowed_up = http.http_service.authorization_response.allowed_upstream_headers.patterns
    assert [(m.prefix, m.exact) for m in allowed_up] == [("x-legation-", ""), ("", "x-user")]
    sent = http.http_service.authorization_request.headers_to_add
    assert [(h.key, h.value) for h in sent] == [
        ("x-legation-policy", f"%METADATA(ROUTE:{HTTP_AUTHZ}:policy)%"),
        ("x-legation-checks", f"%METADATA(ROUTE:{HTTP_AUTHZ}:checks)%"),
        ("x-legation-route", f"%METADATA(ROUTE:{HTTP_AUTHZ}:route)%"),
    ]  # no client address: no route reads it
    cluster = message(out, ResourceType.CLUSTER, "legation|extauthz-http")
    assert cluster.type == cluster_pb2.Cluster.STATIC
    assert not cluster.typed_extension_protocol_options  # HTTP/1.1, Envoy's default
    sock = cluster.load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address
    assert (sock.address, sock.port_value) == ("127.0.0.1", 18020)


JWT_LIMIT = {"actions": [{"jwt_claim": {"claim": "sub", "key": "user"}}]}

# (route's extra keys, the protocol its ext_authz call uses; None: no call)
RULE = [
    ({"authz": "a.b"}, "http"),
    ({"authz": "a.b", "authz_protocol": "grpc"}, "grpc"),
    ({"authz": "a.b", "rate_limits": [JWT_LIMIT]}, "grpc"),
    ({"authz": "a.b", "rate_limits": [{"actions": [{"remote_address": {}}]}]}, "http"),
    ({"authz": "disabled"}, None),
    ({}, None),
]


@pytest.mark.parametrize(("extra", "expected"), RULE, ids=[str(e) for e, _ in RULE])
def test_which_routes_use_the_http_callout(extra: dict[str, Any], expected: str | None) -> None:
    out = snaps(http_mesh({"name": "r", "to": {"service": "ratings"}, **extra}))
    route = routes_of(out["gateway-ingress"], "gateway")["r"]
    grpc = per_route(route, AUTHZ, ext_authz_pb2.ExtAuthzPerRoute)
    http = per_route(route, HTTP_AUTHZ, ext_authz_pb2.ExtAuthzPerRoute)
    assert grpc.disabled == (expected != "grpc")
    assert http.disabled == (expected != "http")
    if expected == "grpc":
        assert dict(grpc.check_settings.context_extensions) == {"policy": "a.b"}
    if expected == "http":
        # the policy travels in the route's metadata, read by the filter's one http_service;
        # no per-route service override (with one Envoy builds the call's client per request)
        assert not http.check_settings.HasField("http_service")
        assert MessageToDict(route.metadata.filter_metadata[HTTP_AUTHZ]) == {"policy": "a.b"}
    else:
        assert HTTP_AUTHZ not in route.metadata.filter_metadata
    # with protocol grpc the same route is gRPC or no call, and has no HTTP override
    data = http_mesh({"name": "r", "to": {"service": "ratings"}, **extra})
    data["extauthz"] = {"port": 18010, "embedded": False}
    plain = routes_of(snaps(data)["gateway-ingress"], "gateway")["r"]
    assert HTTP_AUTHZ not in plain.typed_per_filter_config
    assert per_route(plain, AUTHZ, ext_authz_pb2.ExtAuthzPerRoute).disabled == (expected is None)


def test_default_routes_disable_both_filters() -> None:
    sidecar = snaps(http_mesh())["sidecar-reviews-0"]
    defaults = [
        r
        for r in routes_of(sidecar, "outbound").values()
        if HTTP_AUTHZ in r.typed_per_filter_config and r.name != "guarded"
    ]
    assert defaults
    for route in defaults:
        assert per_route(route, AUTHZ, ext_authz_pb2.ExtAuthzPerRoute).disabled
        assert per_route(route, HTTP_AUTHZ, ext_authz_pb2.ExtAuthzPerRoute).disabled


@pytest.mark.parametrize("mode", ["strict", "permissive"])
def test_with_mtls_the_http_callout_is_called_over_mtls_with_the_same_identity(mode: str) -> None:
    out = snaps(with_mtls(mode, extauthz=HTTP_BLOCK))
    for node in ("gateway-ingress", "sidecar-reviews-0"):
        cluster = message(out[node], ResourceType.CLUSTER, "legation|extauthz-http")
        assert cluster.transport_socket == expected_service_tls(
            "spiffe://example.org/ns/shop/sa/legation-extauthz", alpn="http/1.1"
        ), node
        assert service_cluster(out[node], "extauthz").transport_socket == (
            expected_service_tls("spiffe://example.org/ns/shop/sa/legation-extauthz")
        )
    plain = snaps(with_mtls("strict", extauthz={**HTTP_BLOCK, "tls": "none"}))
    cluster = message(plain["gateway-ingress"], ResourceType.CLUSTER, "legation|extauthz-http")
    assert not cluster.HasField("transport_socket")
