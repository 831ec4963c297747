"""The access-log service in every proxy's config: a gRPC access log per connection manager
(log name = listener name), its cluster, and the JSON access log each proxy is given."""

from __future__ import annotations

from typing import Any

from envoy.config.accesslog.v3 import accesslog_pb2
from envoy.extensions.access_loggers.file.v3 import file_pb2
from envoy.extensions.access_loggers.grpc.v3 import als_pb2
from google.protobuf.json_format import MessageToDict

from legation.observe.envoy_config import JSON_FIELDS
from legation.translate import translate
from legation.translate._services import route_hops
from legation.xds.types import ResourceType
from tests.config.meshdata import base, parse
from tests.translate.test_mesh import hcm_of

ALS = "envoy.access_loggers.http_grpc"


def _logs(data: dict[str, Any]) -> dict[tuple[str, str], list[accesslog_pb2.AccessLog]]:
    """(node, listener) -> its connection manager's access logs."""
    out = {}
    for node, snap in translate(parse(data), version="v1").items():
        for name, res in snap.resources(ResourceType.LISTENER).items():
            hcm = hcm_of(res.message)
            out[(node, name)] = list(hcm.access_log)
    return out


def test_no_block_no_access_log() -> None:
    assert all(logs == [] for logs in _logs(base()).values())


def test_every_connection_manager_streams_to_the_service_under_its_listener_name() -> None:
    data = base()
    data["accesslog"] = {"port": 18013, "embedded": False, "flush_interval": "250ms"}
    logs = _logs(data)
    assert {listener for _, listener in logs} == {"gateway", "inbound", "outbound"}
    for (_, listener), entries in logs.items():
        assert [e.name for e in entries] == [ALS]
        config = als_pb2.HttpGrpcAccessLogConfig()
        entries[0].typed_config.Unpack(config)
        common = config.common_config
        assert common.log_name == listener
        assert common.grpc_service.envoy_grpc.cluster_name == "legation|accesslog"
        assert common.buffer_flush_interval.ToMilliseconds() == 250
    for snap in translate(parse(data), version="v1").values():
        assert "legation|accesslog" in snap.resources(ResourceType.CLUSTER)


def test_json_lines_per_proxy_with_the_documented_fields() -> None:
    data = base()
    node = "sidecar-reviews-0"
    data["accesslog"] = {
        "port": 18013,
        "embedded": False,
        "log": {"to": "file", "path": "/logs/{node}.jsonl"},
        "proxies": {node: {"to": "none"}},
    }
    logs = _logs(data)
    assert [e.name for e in logs[(node, "inbound")]] == [ALS]  # its own: none
    entries = logs[("gateway-ingress", "gateway")]
    assert [e.name for e in entries] == [ALS, "envoy.access_loggers.file"]
    config = file_pb2.FileAccessLog()
    entries[1].typed_config.Unpack(config)
    assert config.path == "/logs/gateway-ingress.jsonl"
    fields = MessageToDict(config.log_format.json_format)
    assert fields == {**JSON_FIELDS, "node": "gateway-ingress", "listener": "gateway"}
    text = " ".join(fields.values()).lower()
    for credential in ("authorization", "cookie", "x-api-key", "token"):
        assert credential not in text
    assert "%PATH(NQ:" in fields["path"]  # no query string: a token may travel there


def test_explain_says_the_service_makes_no_call_per_request() -> None:
    data = base()
    data["accesslog"] = {"port": 18013, "embedded": False}
    hops = route_hops(parse(data), None)
    assert [(h.kind, h.calls) for h in hops] == [("accesslog", False)]


def test_lines_written_by_the_service_ask_envoy_for_the_traceparent() -> None:
    data = base()
    data["accesslog"] = {"port": 18013, "embedded": False, "log": {"to": "service"}}
    for entries in _logs(data).values():
        assert [e.name for e in entries] == [ALS]  # no logger of the proxy's own
        config = als_pb2.HttpGrpcAccessLogConfig()
        entries[0].typed_config.Unpack(config)
        assert list(config.additional_request_headers_to_log) == ["traceparent"]
        assert list(config.additional_response_headers_to_log) == ["x-envoy-upstream-service-time"]
