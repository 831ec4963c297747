"""The Envoy protobufs the mesh translation will embed."""

from __future__ import annotations

import pytest
from envoy.extensions.filters.http.ratelimit.v3 import rate_limit_pb2

from legation.ratelimit import envoy_filter as ef


@pytest.mark.parametrize("mode, deny", [("allow", False), ("deny", True)])
def test_filter_failure_mode_deny_follows_the_service(mode: str, deny: bool) -> None:
    f = ef.rate_limit_filter(domain="edge", cluster="rls", failure_mode=mode, timeout_ms=1500)
    config = rate_limit_pb2.RateLimit()
    assert f.typed_config.Unpack(config)
    assert config.failure_mode_deny is deny
    assert config.domain == "edge"
    assert config.rate_limit_service.grpc_service.envoy_grpc.cluster_name == "rls"
    assert config.enable_x_ratelimit_headers == rate_limit_pb2.RateLimit.DRAFT_VERSION_03
    assert (config.timeout.seconds, config.timeout.nanos) == (1, 500_000_000)


def test_filter_rejects_unknown_failure_mode() -> None:
    with pytest.raises(ValueError, match="failure_mode"):
        ef.rate_limit_filter(domain="d", cluster="c", failure_mode="open")


def test_route_actions_from_specs() -> None:
    (limit,) = ef.route_rate_limits(
        [
            ef.RequestHeader("x-user", "user"),
            ef.RemoteAddress(),
            ef.GenericKey("api", "route"),
            ef.jwt_claim("sub"),
        ]
    )
    kinds = [a.WhichOneof("action_specifier") for a in limit.actions]
    assert kinds == ["request_headers", "remote_address", "generic_key", "metadata"]
    assert limit.actions[0].request_headers.descriptor_key == "user"
    assert limit.actions[2].generic_key.descriptor_key == "route"
    md = limit.actions[3].metadata
    assert md.metadata_key.key == "envoy.filters.http.jwt_authn"
    assert [p.key for p in md.metadata_key.path] == ["jwt_payload", "sub"]
    assert md.skip_if_absent


def test_empty_descriptor_is_an_error() -> None:
    with pytest.raises(ValueError, match="at least one entry"):
        ef.route_rate_limits([])


def test_cluster_is_http2() -> None:
    cluster = ef.rate_limit_cluster("rls", "127.0.0.1", 9000, max_concurrent_streams=8)
    options = cluster.typed_extension_protocol_options[
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    ]
    assert options.type_url.endswith("HttpProtocolOptions")
    assert b"\x08" in options.value  # max_concurrent_streams made it in
