"""``parsed_body`` and ``truncated_body``, by opa-envoy-plugin's rules.

* ``x-envoy-auth-partial-body: true`` (Envoy cut the body at ``max_request_bytes``): truncated,
  nothing parsed, whatever the type.
* The ``content-type`` header is matched by *substring*, case-sensitively, in this order:
  ``application/json`` (so ``application/json-patch+json`` is JSON, ``application/merge-patch+json``
  is not), ``application/grpc``, ``application/x-www-form-urlencoded``, ``multipart/form-data``.
  Any other type, or none, is not parsed: ``parsed_body`` is null and the body is not truncated.
* The payload is ``body``, else ``raw_body`` (``pack_as_bytes``); none at all parses to null.
* For JSON, form and multipart: a ``content-length`` larger than the payload means truncated
  (nothing parsed); one that is not an integer is an error, as a payload that does not parse.
* A multipart part is a string, or a JSON value when its own content type names JSON; values
  are lists per field name. A part without a form-data name is skipped.
* gRPC bodies are parsed only with a descriptor set (:class:`ProtoSet`): the first message of
  the ``/package.Service/Method`` call is decoded as the method's input type and rendered as
  protojson. A compressed or unknown call parses to null, a message cut short is truncated, a
  path that is not two segments is an error.

Errors are :class:`~legation.extauthz.errors.AuthzError` ``malformed_body`` (400), where
opa-envoy-plugin answers 400 ``request_parse_error``.
"""

from __future__ import annotations

import json
import re
from email.message import Message
from pathlib import Path
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory

from legation.errors import ConfigError
from legation.extauthz.errors import AuthzError

_INT64 = re.compile(r"[+-]?[0-9]+")


def _error(message: str) -> AuthzError:
    return AuthzError(message, code="malformed_body", status=400)


class ProtoSet:
    """A protobuf descriptor set (``protoc --descriptor_set_out --include_imports``) to decode
    gRPC request bodies with, as opa-envoy-plugin's ``proto_descriptor`` option."""

    def __init__(self, data: bytes) -> None:
        files = descriptor_pb2.FileDescriptorSet.FromString(data)
        self.pool = descriptor_pool.DescriptorPool()
        for file in files.file:
            self.pool.Add(file)
        self._classes: dict[tuple[str, str], Any] = {}

    @classmethod
    def load(cls, path: str | Path) -> ProtoSet:
        """Read a descriptor set file; ConfigError naming the file when it cannot be used."""
        try:
            return cls(Path(path).read_bytes())
        except OSError as e:
            raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
        except Exception as e:  # a corrupt set, an unresolved import
            raise ConfigError(f"{path}: not a usable descriptor set: {e}") from None

    def input_class(self, service: str, method: str) -> Any:
        """The message class of ``service``'s ``method`` input; None when unknown or
        client-streaming (as opa-envoy-plugin, which then leaves the body unparsed)."""
        key = (service, method)
        if key not in self._classes:
            found = None
            try:
                svc = self.pool.FindServiceByName(service)
            except KeyError:
                svc = None
            m = svc.methods_by_name.get(method) if svc is not None else None
            if m is not None and not m.client_streaming:
                found = message_factory.GetMessageClass(m.input_type)
            if len(self._classes) < 4096:
                self._classes[key] = found
            return found
        return self._classes[key]


def parse(http: Any, parsed_path: list[str], proto_set: ProtoSet | None) -> tuple[Any, bool]:
    """``(parsed_body, truncated_body)`` for the CheckRequest's ``attributes.request.http``."""
    headers = http.headers
    if headers.get("x-envoy-auth-partial-body") == "true":
        return None, True
    ctype = headers.get("content-type")
    if ctype is None:
        return None, False
    if "application/json" in ctype:
        payload = _payload(http)
        if not payload or _truncated(headers, payload):
            return None, bool(payload)
        return _json(payload, "request body"), False
    if "application/grpc" in ctype:
        return _grpc(http.raw_body, parsed_path, proto_set)
    if "application/x-www-form-urlencoded" in ctype:
        payload = _payload(http)
        if not payload or _truncated(headers, payload):
            return None, bool(payload)
        from legation.extauthz.request import parse_query  # the one url.ParseQuery

        try:
            return parse_query(payload.decode("utf-8", "replace")), False
        except ValueError as e:
            raise _error(f"form body cannot be parsed: {e}") from None
    if "multipart/form-data" in ctype:
        payload = _payload(http)
        if not payload or _truncated(headers, payload):
            return None, bool(payload)
        return _multipart(payload, ctype), False
    return None, False


def _payload(http: Any) -> bytes:
    body: str = http.body
    return body.encode() if body else bytes(http.raw_body)


def _truncated(headers: Any, payload: bytes) -> bool:
    length = headers.get("content-length")
    if length is None:
        return False
    if not _INT64.fullmatch(length) or not -(2**63) <= int(length) < 2**63:
        raise _error("content-length header is not a number")
    n = int(length)
    return n != -1 and n > len(payload)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _json(data: bytes, what: str) -> Any:
    try:
        return json.loads(data.decode("utf-8", "replace"), parse_constant=_no_constant)
    except (ValueError, RecursionError):
        raise _error(f"{what} is not valid JSON") from None


def _grpc(raw: bytes, parsed_path: list[str], proto_set: ProtoSet | None) -> tuple[Any, bool]:
    if proto_set is None or not raw:
        return None, False
    if len(parsed_path) != 2:
        raise _error("a gRPC request path must be /<service>/<method>")
    if len(raw) < 5:
        raise _error("a gRPC body shorter than its 5-byte frame header")
    if raw[0] != 0:
        return None, False  # compressed: not decoded
    size = int.from_bytes(raw[1:5], "big")
    if size > len(raw) - 5:
        return None, True
    cls = proto_set.input_class(parsed_path[0], parsed_path[1])
    if cls is None:
        return None, False
    try:
        message = cls.FromString(raw[5 : 5 + size])
        return json_format.MessageToDict(message), False
    except Exception:  # DecodeError, or a message protojson cannot render
        raise _error("the gRPC message does not decode as its method's input") from None


def _params(header: str, value: str) -> Message:
    m = Message()
    m[header] = value
    return m


def _multipart(payload: bytes, ctype: str) -> dict[str, list[Any]] | None:
    boundary = _params("content-type", ctype).get_param("boundary")
    if not isinstance(boundary, str) or not boundary:
        return None  # no boundary: not parsed
    values: dict[str, list[Any]] = {}
    for headers, body in _parts(payload, boundary.encode()):
        disposition = headers.get("content-disposition", "")
        m = _params("content-disposition", disposition)
        name = m.get_param("name", header="content-disposition")
        if m.get_content_disposition() != "form-data" or not isinstance(name, str) or not name:
            continue
        if "application/json" in headers.get("content-type", ""):
            values.setdefault(name, []).append(_json(body, f"multipart field {name[:64]!r}"))
        else:
            values.setdefault(name, []).append(body.decode("utf-8", "replace"))
    return values


def _parts(payload: bytes, boundary: bytes) -> list[tuple[dict[str, str], bytes]]:
    """The parts between ``--boundary`` lines (LF or CRLF ends), up to ``--boundary--``.
    A payload that never closes its last part is an error, as for Go's multipart reader."""
    dash = b"--" + boundary
    lines = payload.split(b"\n")
    i, n = 0, len(lines)
    while i < n and lines[i].rstrip(b"\r \t") != dash:  # the preamble
        if lines[i].rstrip(b"\r \t") == dash + b"--":
            return []
        i += 1
    if i == n:
        raise _error("multipart body has no boundary line")
    parts = []
    i += 1
    while True:
        headers: dict[str, str] = {}
        while i < n and lines[i].rstrip(b"\r"):
            key, sep, value = lines[i].rstrip(b"\r").decode("utf-8", "replace").partition(":")
            if not sep:
                raise _error("multipart part header without ':'")
            headers[key.strip().lower()] = value.strip()
            i += 1
        i += 1  # the blank line
        start = i
        while i < n and lines[i].rstrip(b"\r \t") not in (dash, dash + b"--"):
            i += 1
        if i >= n:
            raise _error("multipart body ends inside a part")
        body = b"\n".join(lines[start:i])
        if body.endswith(b"\r"):
            body = body[:-1]
        parts.append((headers, body))
        if lines[i].rstrip(b"\r \t") == dash + b"--":
            return parts
        i += 1
