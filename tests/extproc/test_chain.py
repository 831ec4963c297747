"""A chain's processing mode comes from the phases its filters declare."""

from __future__ import annotations

from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode as PM

from legation.extproc import envoy_filter
from legation.extproc.chain import Chain
from legation.extproc.config import CHAIN_METADATA_KEY
from legation.extproc.filters.body_redact import BodyRedactFactory
from legation.extproc.filters.header_route import HeaderRouteFactory
from legation.extproc.filters.headers import HeadersFactory
from legation.extproc.filters.request_id import RequestIdFactory
from tests.extproc.filters_for_tests import UpperStreamed, WrapBuffered


def _make(factory, options=None):
    return factory.create(factory.validate(options or {}))


def test_header_route_alone_is_request_headers_only():
    chain = Chain(
        name="c",
        filters=[
            _make(
                HeaderRouteFactory(), {"rules": [{"header": "x-a", "present": True, "value": "b"}]}
            )
        ],
    )
    mode = chain.processing_mode()
    assert mode.request_header_mode == PM.SEND
    assert mode.response_header_mode == PM.SKIP
    assert mode.request_body_mode == PM.NONE
    assert mode.response_body_mode == PM.NONE
    assert mode.request_trailer_mode == PM.SKIP


def test_phases_are_the_union_and_streaming_wins():
    chain = Chain(
        name="c",
        filters=[
            _make(RequestIdFactory()),
            WrapBuffered(),
            UpperStreamed(),
            _make(BodyRedactFactory(), {"fields": ["a"]}),
        ],
    )
    mode = chain.processing_mode()
    assert mode.response_header_mode == PM.SEND
    assert mode.request_body_mode == PM.STREAMED
    # body_redact asks for the response body per request (mode_override), not statically
    assert mode.response_body_mode == PM.NONE


def test_headers_filter_declares_only_the_sides_it_changes():
    only_response = _make(HeadersFactory(), {"response": {"remove": ["server"]}})
    mode = Chain(name="c", filters=[only_response]).processing_mode()
    assert mode.request_header_mode == PM.SKIP
    assert mode.response_header_mode == PM.SEND


def test_per_route_carries_mode_chain_name_and_policy():
    chain = Chain(name="web", fail_open=True, filters=[WrapBuffered()])
    per_route = envoy_filter.per_route(chain)
    assert not per_route.disabled
    assert per_route.overrides.processing_mode.request_body_mode == PM.BUFFERED
    assert [(h.key, h.value) for h in per_route.overrides.grpc_initial_metadata] == [
        (CHAIN_METADATA_KEY, "web")
    ]
    assert per_route.overrides.failure_mode_allow.value is True
    closed = envoy_filter.per_route(chain, fail_open=False)
    assert closed.overrides.failure_mode_allow.value is False


def test_no_chain_or_no_phases_disables_the_filter():
    assert envoy_filter.per_route(None).disabled
    assert envoy_filter.per_route(Chain(name="empty", filters=[])).disabled


def test_grpc_cluster_is_http2():
    cluster = envoy_filter.grpc_cluster("extproc", "127.0.0.1", 9000)
    from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2

    opts = http_protocol_options_pb2.HttpProtocolOptions()
    cluster.typed_extension_protocol_options[
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    ].Unpack(opts)
    assert opts.explicit_http_config.HasField("http2_protocol_options")
