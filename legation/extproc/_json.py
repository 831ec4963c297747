"""ext_proc messages as the proto3 JSON Envoy's HTTP transport speaks.

Envoy's ext_proc filter with ``http_service`` POSTs each ``ProcessingRequest`` as proto3 JSON
(``MessageUtil::getJsonStringFromMessage``: proto field names, header values in ``raw_value`` as
base64) and reads the ``ProcessingResponse`` of a 200 answer the same way.

:func:`parse_request` is ``json_format.Parse`` (unknown fields, bad JSON and duplicate keys
refused), with a shortcut for the shape Envoy sends for a headers message: a document holding
only a headers phase of ``key`` / ``raw_value`` pairs (canonical base64), ``end_of_stream`` and
empty ``metadata_context`` / ``protocol_config`` is built directly, anything else goes through
``json_format``. The shortcut accepts a strict subset of what ``json_format`` accepts and builds
the same message (``tests/extproc/test_json.py`` checks both, with hypothesis).

:func:`encode_response` is ``json_format.MessageToDict(preserving_proto_field_name=True)`` as
compact JSON, walking the set fields directly (half the time), remembered per distinct answer
(a chain's answers repeat); the tests check it against ``MessageToDict`` field for field.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable
from typing import Any

from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from google.protobuf import descriptor, json_format
from google.protobuf.message import Message

__all__ = ["BadRequest", "encode_response", "parse_request"]

_PHASE_KEYS = frozenset({"request_headers", "response_headers"})
_EMPTY_KEYS = ("metadata_context", "protocol_config")
_HEADER_KEYS = frozenset({"key", "raw_value"})


class BadRequest(ValueError):
    """The body is not a ``ProcessingRequest`` in proto3 JSON (the message says why)."""


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)  # in C: a key given twice leaves fewer entries than pairs
    if len(out) != len(pairs):
        raise BadRequest("a key is given twice in one object")
    return out


def parse_request(body: bytes) -> pb.ProcessingRequest:
    """The ``ProcessingRequest`` in ``body``; BadRequest for anything else."""
    try:
        doc = json.loads(body.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except BadRequest:
        raise
    except (ValueError, RecursionError) as err:  # UnicodeDecodeError is a ValueError
        raise BadRequest(f"not JSON: {type(err).__name__}") from None
    if not isinstance(doc, dict):
        raise BadRequest("not a JSON object")
    req = _direct(doc)
    if req is not None:
        return req
    try:
        return json_format.ParseDict(doc, pb.ProcessingRequest())  # type: ignore[no-any-return]
    except (json_format.ParseError, RecursionError) as err:
        raise BadRequest(str(err)[:200]) from None


def _direct(doc: dict[str, Any]) -> pb.ProcessingRequest | None:
    """``doc`` as Envoy's headers message, built directly; None when it is not exactly that
    shape (``json_format`` then decides)."""
    phase = None
    for key, value in doc.items():
        if key in _PHASE_KEYS and phase is None:
            phase = key
        elif key not in _EMPTY_KEYS or value != {} or type(value) is not dict:
            return None
    if phase is None:
        return None
    part = doc[phase]
    if type(part) is not dict or not part.keys() <= {"headers", "end_of_stream"}:
        return None
    eos = part.get("end_of_stream", False)
    header_map = part.get("headers")
    if type(eos) is not bool:
        return None
    pairs: list[tuple[str, bytes]] = []
    if header_map is not None:
        if type(header_map) is not dict or not header_map.keys() <= {"headers"}:
            return None
        items = header_map.get("headers", [])
        if type(items) is not list:
            return None
        for item in items:
            if type(item) is not dict or not item.keys() <= _HEADER_KEYS:
                return None
            name, raw = item.get("key", ""), item.get("raw_value", "")
            if type(name) is not str or type(raw) is not str or not name.isascii():
                return None
            try:
                pairs.append((name, binascii.a2b_base64(raw, strict_mode=True) if raw else b""))
            except (binascii.Error, ValueError):
                return None
    req = pb.ProcessingRequest()
    for key in _EMPTY_KEYS:
        if key in doc:
            getattr(req, key).SetInParent()
    msg = getattr(req, phase)
    msg.SetInParent()
    if eos:
        msg.end_of_stream = True
    if header_map is not None:
        msg.headers.SetInParent()
        add = msg.headers.headers.add
        for name, raw in pairs:
            add(key=name, raw_value=raw)
    return req


# -- answers ----------------------------------------------------------------------------------

_FD = descriptor.FieldDescriptor
_WRAPPERS = frozenset(
    f"google.protobuf.{n}Value"
    for n in ("Bool", "String", "Bytes", "Int32", "UInt32", "Int64", "UInt64", "Float", "Double")
)
_INT64 = frozenset({_FD.CPPTYPE_INT64, _FD.CPPTYPE_UINT64})


def _whole(value: Message) -> Any:
    return json_format.MessageToDict(value, preserving_proto_field_name=True)


def _converter(fd: descriptor.FieldDescriptor) -> Callable[[Any], Any]:
    """How one (non-repeated) value of ``fd`` becomes JSON, as ``json_format`` writes it."""
    if fd.type == _FD.TYPE_MESSAGE:
        full = fd.message_type.full_name
        if full in _WRAPPERS:
            inner = _converter(fd.message_type.fields_by_name["value"])
            return lambda v: inner(v.value)
        if full.startswith("google.protobuf."):  # Struct, Duration, Any...: json_format's
            return _whole
        return _fields
    if fd.type == _FD.TYPE_BYTES:
        return lambda v: base64.b64encode(v).decode("ascii")
    if fd.type == _FD.TYPE_ENUM:
        names = fd.enum_type.values_by_number
        return lambda v: names[v].name if v in names else v
    if fd.cpp_type in _INT64:
        return str
    return lambda v: v  # bool, string, 32-bit ints (ext_proc's answers carry no floats)


def _field(fd: descriptor.FieldDescriptor) -> Callable[[Any], Any]:
    """How the whole value of ``fd`` (a list when repeated, a dict for a map) becomes JSON."""
    if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
        value = _converter(fd.message_type.fields_by_name["value"])
        return lambda m: {str(k): value(v) for k, v in m.items()}
    one = _converter(fd)
    if fd.is_repeated:
        return lambda values: [one(v) for v in values]
    return one


_CONVERTERS: dict[descriptor.FieldDescriptor, Callable[[Any], Any]] = {}


def _fields(msg: Message) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for fd, value in msg.ListFields():
        conv = _CONVERTERS.get(fd)
        if conv is None:
            conv = _CONVERTERS[fd] = _field(fd)
        out[fd.name] = conv(value)
    return out


_ENCODED: dict[bytes, bytes] = {}
_ENCODED_KEEP = 1024


def encode_response(resp: pb.ProcessingResponse) -> bytes:
    """``resp`` as compact proto3 JSON (proto field names). The JSON is a function of the
    message alone, so it is remembered by the message's deterministic wire bytes (a chain's
    answers repeat: ``header_route`` has a handful); at most :data:`_ENCODED_KEEP`, oldest
    forgotten first."""
    key = resp.SerializeToString(deterministic=True)
    found = _ENCODED.get(key)
    if found is None:
        found = json.dumps(_fields(resp), separators=(",", ":")).encode()
        if len(_ENCODED) >= _ENCODED_KEEP:
            del _ENCODED[next(iter(_ENCODED))]
        _ENCODED[key] = found
    return found
