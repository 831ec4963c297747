"""A protobuf message as the plain document opa-envoy-plugin hands to a policy.

opa-envoy-plugin (since 2025) no longer round-trips the CheckRequest through protojson: it walks
the message's *populated* fields and keeps native values. What a policy sees, and so what this
module builds:

* keys are the fields' JSON names (``contextExtensions``, ``rawBody``, ``headerMap``);
* a field is present only when it is populated: a scalar at its zero value (``""``, ``0``,
  ``false``), an empty map and an empty list are absent; a message field that is set is present
  even when empty (``{}``);
* 64-bit integers (``http.size``) and enums are numbers, not strings;
* ``bytes`` are base64 strings (standard alphabet, padded), as Go's JSON encoding of ``[]byte``;
* a ``google.protobuf.Timestamp`` is a message like any other: ``{"seconds": n, "nanos": n}``
  (``request.time``), not an RFC 3339 string;
* a ``google.protobuf.Struct`` (``metadataContext.filterMetadata.*``) is its plain JSON object,
  its numbers floats.

``only`` (a projection tree, see :mod:`legation.extauthz.request`) limits the walk to the named
fields, and a string-keyed map (the headers) to the named keys; the values under them are
projected by the caller.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Any

from google.protobuf.json_format import MessageToDict

_STRUCT = "google.protobuf.Struct"

# Field kinds, decided once per field descriptor.
(
    _SCALAR,
    _BYTES,
    _MESSAGE,
    _LIST,
    _LIST_BYTES,
    _LIST_MESSAGE,
    _MAP,
    _MAP_STR,
    _MAP_BYTES,
    _MAP_MESSAGE,
) = range(10)
_kinds: dict[Any, tuple[str, int]] = {}


def _kind(fd: Any) -> tuple[str, int]:
    found = _kinds.get(fd)
    if found is not None:
        return found
    message = fd.message_type
    is_map = message is not None and message.GetOptions().map_entry
    if is_map:
        value_fd = message.fields_by_name["value"]
        kind = (
            _MAP_MESSAGE
            if value_fd.message_type is not None
            else _MAP_BYTES
            if value_fd.type == fd.TYPE_BYTES
            else _MAP_STR
            if message.fields_by_name["key"].type == fd.TYPE_STRING
            else _MAP
        )
    elif fd.is_repeated:
        kind = (
            _LIST_MESSAGE
            if message is not None
            else _LIST_BYTES
            if fd.type == fd.TYPE_BYTES
            else _LIST
        )
    else:
        kind = _MESSAGE if message is not None else _BYTES if fd.type == fd.TYPE_BYTES else _SCALAR
    found = (fd.json_name, kind)
    if len(_kinds) < 4096:  # descriptors are few and static; bounded all the same
        _kinds[fd] = found
    return found


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


_by_json: dict[Any, dict[str, Any]] = {}


def _populated(message: Any, only: Mapping[str, Any]) -> list[tuple[Any, Any]]:
    """``ListFields()`` restricted to the JSON names in ``only``, without visiting the rest."""
    descriptor = message.DESCRIPTOR
    names = _by_json.get(descriptor)
    if names is None:
        names = {fd.json_name: fd for fd in descriptor.fields}
        if len(_by_json) < 1024:
            _by_json[descriptor] = names
    out = []
    for name in only:
        fd = names.get(name)
        if fd is None:
            continue
        if fd.message_type is not None and not fd.is_repeated:
            if message.HasField(fd.name):
                out.append((fd, getattr(message, fd.name)))
        else:
            value = getattr(message, fd.name)
            if value:  # proto3: a zero scalar, an empty list or map is not populated
                out.append((fd, value))
    return out


def protomap(message: Any, only: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``message``'s populated fields as a plain document (see the module docstring)."""
    if message.DESCRIPTOR.full_name == _STRUCT:
        return MessageToDict(message)  # type: ignore[no-any-return]
    out: dict[str, Any] = {}
    for fd, value in _populated(message, only) if only else message.ListFields():
        name, kind = _kind(fd)
        sub = (only[name] or None) if only else None
        if kind == _SCALAR:
            out[name] = value
        elif kind == _MESSAGE:
            out[name] = protomap(value, sub)
        elif kind == _MAP_STR:  # headers: only the names projected, when some are
            out[name] = dict(value) if sub is None else {k: value[k] for k in sub if k in value}
        elif kind == _MAP:
            out[name] = _plain_map(value)
        elif kind == _MAP_BYTES:
            out[name] = {_key(k): _b64(v) for k, v in value.items()}
        elif kind == _MAP_MESSAGE:
            out[name] = {_key(k): protomap(v) for k, v in value.items()}
        elif kind == _BYTES:
            out[name] = _b64(value)
        elif kind == _LIST:
            out[name] = list(value)
        elif kind == _LIST_BYTES:
            out[name] = [_b64(v) for v in value]
        else:
            out[name] = [protomap(v) for v in value]
    return out


def _plain_map(value: Any) -> dict[Any, Any]:
    """A protobuf map of scalars as a dict with string keys (JSON objects have no others)."""
    items = dict(value)
    if items and not isinstance(next(iter(items)), str):
        return {_key(k): v for k, v in items.items()}
    return items


def _key(key: Any) -> str:
    if isinstance(key, bool):
        return "true" if key else "false"
    return str(key)
