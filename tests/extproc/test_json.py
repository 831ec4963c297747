"""The HTTP transport's JSON: the request parser agrees with ``json_format.Parse`` on anything,
its shortcut included, and the answers are ``MessageToDict``'s (hypothesis)."""

from __future__ import annotations

import base64
import json
from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from google.protobuf import json_format
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from legation.extproc import _wire
from legation.extproc._json import BadRequest, encode_response, parse_request
from legation.extproc.exchange import Exchange
from legation.extproc.sdk import BodyMode, Phase

names = st.text(alphabet=st.characters(codec="utf-8"), max_size=12)
values = st.binary(max_size=24)
header_lists = st.lists(st.tuples(names, values), max_size=8)


def reference(body: bytes) -> pb.ProcessingRequest | None:
    """json_format's reading of ``body``, None when it refuses it."""
    try:
        return json_format.Parse(body, pb.ProcessingRequest())  # type: ignore[no-any-return]
    except (json_format.ParseError, UnicodeDecodeError):
        return None


def ours(body: bytes) -> pb.ProcessingRequest | None:
    try:
        return parse_request(body)
    except BadRequest:
        return None


def envoy_json(pairs: list[tuple[str, bytes]], phase: str, eos: bool) -> bytes:
    """What Envoy sends: the message as proto3 JSON, proto field names."""
    req = pb.ProcessingRequest()
    msg = getattr(req, phase)
    msg.end_of_stream = eos
    for key, value in pairs:
        msg.headers.headers.append(base_pb2.HeaderValue(key=key, raw_value=value))
    req.metadata_context.SetInParent()
    req.protocol_config.SetInParent()
    return json_format.MessageToJson(req, preserving_proto_field_name=True).encode()


@settings(max_examples=300, deadline=None)
@given(header_lists, st.sampled_from(["request_headers", "response_headers"]), st.booleans())
def test_envoy_shaped_messages_read_as_json_format_reads_them(pairs, phase, eos):
    body = envoy_json(pairs, phase, eos)
    assert ours(body) == reference(body) is not None


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)
header_items = st.dictionaries(
    st.sampled_from(["key", "raw_value", "value", "extra"]),
    st.text(max_size=8) | json_values,
    max_size=3,
)
near_envoy = st.fixed_dictionaries(
    {},
    optional={
        "request_headers": st.fixed_dictionaries(
            {},
            optional={
                "headers": st.fixed_dictionaries(
                    {}, optional={"headers": st.lists(header_items, max_size=3) | json_values}
                )
                | json_values,
                "end_of_stream": st.booleans() | json_values,
            },
        )
        | json_values,
        "response_headers": json_values,
        "metadata_context": st.just({}) | json_values,
        "protocol_config": st.just({}) | json_values,
        "request_body": json_values,
        "nonsense": json_values,
    },
)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(near_envoy)
def test_any_document_is_accepted_or_refused_exactly_as_json_format_does(doc):
    body = json.dumps(doc).encode()
    assert ours(body) == reference(body)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_arbitrary_bytes_give_a_message_or_bad_request_never_a_crash(body):
    assert ours(body) == reference(body)


def test_base64_that_is_not_canonical_is_left_to_json_format():
    # URL-safe alphabet and missing padding: json_format accepts both; the shortcut does not
    # decide them, so the two still agree
    for raw in ("-_-_", "YQ", "YQ=", "Y Q=="):
        doc = {"request_headers": {"headers": {"headers": [{"key": "a", "raw_value": raw}]}}}
        body = json.dumps(doc).encode()
        assert ours(body) == reference(body)


mutations = st.lists(
    st.tuples(st.sampled_from(["set", "add", "remove", "metadata", "route"]), names, names),
    max_size=6,
)


@settings(max_examples=300, deadline=None)
@given(
    mutations,
    st.one_of(st.none(), st.tuples(st.integers(200, 599), st.binary(max_size=16), names)),
    st.booleans(),
)
def test_answers_encode_as_message_to_dict(steps, immediate, wants_body):
    ex = Exchange("c")
    ex.begin(Phase.REQUEST_HEADERS)
    ex.request_headers.update({"a": "1", "b": "2"})
    for op, name, value in steps:
        if op == "set":
            ex.set_header(name or "x", value)
        elif op == "add":
            ex.add_header(name or "x", value)
        elif op == "remove":
            ex.remove_header(name or "a")
        elif op == "metadata":
            ex.set_metadata(name, value)
        else:
            ex.clear_route_cache()
    if wants_body:
        ex.want_body(Phase.RESPONSE_BODY, BodyMode.STREAMED)
    if immediate is not None:
        status, body, details = immediate
        ex.respond(status, body, headers={"x-why": details}, details=details)
    resp = _wire.response(Phase.REQUEST_HEADERS, ex, processing_mode_pb2.ProcessingMode())
    encoded = encode_response(resp)
    assert json.loads(encoded) == json_format.MessageToDict(resp, preserving_proto_field_name=True)
    assert json_format.Parse(encoded, pb.ProcessingResponse()) == resp


def test_error_answer_round_trips():
    resp = _wire.error_response(500, "legation_x")
    doc: dict[str, Any] = json.loads(encode_response(resp))
    assert doc["immediate_response"]["status"]["code"] == "InternalServerError"
    assert base64.b64decode(doc["immediate_response"]["body"]) == b"InternalServerError\n"


def test_remembered_answers_stay_bounded_and_exact():
    from legation.extproc import _json

    answers = [_wire.error_response(500, f"legation_{i}") for i in range(_json._ENCODED_KEEP + 50)]
    for resp in answers:
        assert json.loads(encode_response(resp))["immediate_response"]["details"] == (
            resp.immediate_response.details
        )
    assert len(_json._ENCODED) <= _json._ENCODED_KEEP
    again = answers[-1]
    assert encode_response(again) is encode_response(again)  # remembered: the same bytes
