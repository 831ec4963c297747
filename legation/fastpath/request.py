"""The HTTP request Envoy's ext_authz sends (HTTP mode), read as the ``CheckRequest`` gRPC carries.

:func:`read_call` reads the call into an :class:`HttpCheck` (the fields that CheckRequest would
hold) and :class:`CallContext` serves it to the checks as a
:class:`~legation.extauthz.request.RequestContext`: policies see the document gRPC's would
give them (:func:`call_input`, equal to ``build_input`` of :func:`check_request`'s message, a
property test holds the two together), without building the protobuf message and reading it
back on every call; a check that reads ``ctx.request`` gets that message, built on first use.
What HTTP mode sends, and so what the document holds:

* ``method``, ``path`` (the request target with the filter's ``path_prefix`` cut off, query
  included, as Envoy received it), ``host`` (the Host header), ``headers``: ``:authority``,
  ``:method``, ``:path`` as Envoy's gRPC client puts them, plus every header Envoy passed
  (Authorization and the filter's ``allowed_headers``; ``x-envoy-auth-partial-body`` with a cut
  body), less Envoy's own hop headers (``x-envoy-internal``, ``x-envoy-expected-rq-timeout-ms``),
  the Content-Length of the call itself and Legation's route headers;
* ``body`` (``raw_body`` when it is not UTF-8) when the filter sends bodies;
* ``context_extensions``: ``policy`` and ``checks`` from
  :data:`~legation.fastpath.contract.POLICY_HEADER` and
  :data:`~legation.fastpath.contract.CHECKS_HEADER`, which Envoy sets from the route's
  metadata (:func:`legation.fastpath.envoy_filter.configure_route`).

Not in HTTP mode, so absent from the document: source and destination addresses and principals
(no ``spiffe_id``), the request's id, time, size, scheme and protocol, headers outside
``allowed_headers``, the metadata context.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Any

from envoy.service.auth.v3 import external_auth_pb2

from legation.extauthz._body import parse as parse_body
from legation.extauthz.request import (
    DEFAULT_OPTIONS,
    VERSION,
    InputOptions,
    InputPaths,
    RequestContext,
    new_decision_id,
    parse_path,
    project,
)
from legation.fastpath.contract import (
    CHECKS_HEADER,
    PATH_PREFIX,
    POLICY_HEADER,
    REMOTE_ADDRESS_HEADER,
    ROUTE_HEADER,
)

# Headers of the call itself, not of the client's request.
_CALL_HEADERS = frozenset(
    {
        "host",
        "content-length",
        "x-envoy-internal",
        "x-envoy-expected-rq-timeout-ms",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "te",
        "trailer",
        "upgrade",
        POLICY_HEADER,
        CHECKS_HEADER,
        ROUTE_HEADER,
        REMOTE_ADDRESS_HEADER,
    }
)
_PREFIX = PATH_PREFIX.encode()
# header name as sent -> its lower-cased text: the same few names arrive call after call; bounded
# in count and length (names a client invents past that are decoded each time)
_NAMES: dict[bytes, str] = {}
_MAX_NAMES = 512


class NotACheck(ValueError):
    """The request is not one Envoy's ext_authz filter would send (no path prefix, no Host)."""


class HttpCheck:
    """One call, read: the fields of the ``CheckRequest`` it stands for. ``headers`` holds the
    client's headers (lower-case names, a repeated name joined with ``,``) and the pseudo-headers,
    as that message's header map; ``extensions`` its ``context_extensions``; ``body`` the body
    when it is UTF-8, else ``raw_body``."""

    __slots__ = ("body", "extensions", "headers", "host", "method", "path", "raw_body")

    def __init__(
        self,
        method: str,
        path: str,
        host: str,
        headers: dict[str, str],
        extensions: dict[str, str],
        body: str = "",
        raw_body: bytes = b"",
    ) -> None:
        self.method, self.path, self.host = method, path, host
        self.headers, self.extensions = headers, extensions
        self.body, self.raw_body = body, raw_body


def read_call(
    method: bytes,
    target: bytes,
    headers: Sequence[tuple[bytes, bytes]],
    body: bytes,
    call: dict[str, str] | None = None,
) -> HttpCheck:
    """Read one call. Header names arrive as sent; they are lower-cased here (Envoy sends them
    lower-case). A name sent twice is joined with ``,`` as Envoy joins repeated headers in a
    CheckRequest. ``call`` receives the fused-call headers (:data:`ROUTE_HEADER`,
    :data:`REMOTE_ADDRESS_HEADER`), which are not the client's. Raises :class:`NotACheck`."""
    if not target.startswith(_PREFIX) or target[len(_PREFIX) : len(_PREFIX) + 1] not in (
        b"/",
        b"*",
    ):
        raise NotACheck(f"the request target does not start with {PATH_PREFIX}/")
    path = target[len(_PREFIX) :].decode("utf-8", "replace")
    m = method.decode("latin-1")
    out: dict[str, str] = {}
    extensions: dict[str, str] = {}
    host = ""
    names = _NAMES
    for raw_name, raw_value in headers:
        name = names.get(raw_name)
        if name is None:
            name = raw_name.decode("latin-1").lower()
            if len(names) < _MAX_NAMES and len(raw_name) <= 64:
                names[raw_name] = name
        value = raw_value.decode("utf-8", "replace")
        if name in _CALL_HEADERS:
            if name == "host":
                if host:
                    raise NotACheck("more than one Host header")
                host = value
            elif name == POLICY_HEADER:
                extensions["policy"] = value
            elif name == CHECKS_HEADER:
                extensions["checks"] = value
            elif call is not None and name in (ROUTE_HEADER, REMOTE_ADDRESS_HEADER):
                if name in call:
                    raise NotACheck(f"more than one {name} header")
                call[name] = value
            continue
        out[name] = f"{out[name]},{value}" if name in out else value
    if not host:
        raise NotACheck("no Host header")
    out[":authority"] = host
    out[":method"] = m
    out[":path"] = path
    if not body:
        return HttpCheck(m, path, host, out, extensions)
    try:
        return HttpCheck(m, path, host, out, extensions, body.decode())
    except UnicodeDecodeError:
        return HttpCheck(m, path, host, out, extensions, raw_body=body)


def to_check_request(c: HttpCheck) -> external_auth_pb2.CheckRequest:
    """The ``CheckRequest`` gRPC would carry for ``c``."""
    request = external_auth_pb2.CheckRequest()
    attrs = request.attributes
    http = attrs.request.http
    http.method = c.method
    http.path = c.path
    http.host = c.host
    http.headers.update(c.headers)
    attrs.context_extensions.update(c.extensions)
    if c.body:
        http.body = c.body
    elif c.raw_body:
        http.raw_body = c.raw_body
    return request


def check_request(
    method: bytes,
    target: bytes,
    headers: Sequence[tuple[bytes, bytes]],
    body: bytes,
    call: dict[str, str] | None = None,
) -> external_auth_pb2.CheckRequest:
    """The CheckRequest for one call (:func:`read_call`, then :func:`to_check_request`)."""
    return to_check_request(read_call(method, target, headers, body, call))


class CallContext(RequestContext):
    """The :class:`RequestContext` of one HTTP call: the checks read the call's fields, and
    ``request`` (the ``CheckRequest``) is built only if a check asks for it."""

    __slots__ = ("_call", "_request")

    def __init__(self, call: HttpCheck, options: InputOptions | None = None) -> None:
        self._call = call
        self._request: external_auth_pb2.CheckRequest | None = None
        self.options = options or DEFAULT_OPTIONS
        self.headers = call.headers
        self.extensions = call.extensions
        self.claims = None
        self.jwt_provider = None
        self.decision_id = new_decision_id()
        self._input = None

    @property  # type: ignore[override]
    def request(self) -> external_auth_pb2.CheckRequest:
        if self._request is None:
            self._request = to_check_request(self._call)
        return self._request

    @property
    def method(self) -> str:
        return self._call.method

    @property
    def path(self) -> str:
        return self._call.path

    @property
    def spiffe_id(self) -> str | None:
        return None  # HTTP mode carries no peer principal

    def body_size(self) -> int:
        return len(self._call.body) + len(self._call.raw_body)

    def _build(self, only: InputPaths | None) -> dict[str, Any]:
        return call_input(self._call, only, self.options)


def call_input(
    c: HttpCheck, only: InputPaths | None = None, options: InputOptions = DEFAULT_OPTIONS
) -> dict[str, Any]:
    """``build_input(to_check_request(c), only, options)``, built from ``c`` directly: the
    populated fields under their JSON names, in the message's field order (see
    :mod:`legation.extauthz._protomap`)."""
    doc: dict[str, Any] = {}
    if only is None or "attributes" in only:
        http: dict[str, Any] = {}
        if c.method:
            http["method"] = c.method
        http["headers"] = dict(c.headers)  # never empty: the pseudo-headers are always there
        if c.path:
            http["path"] = c.path
        if c.host:
            http["host"] = c.host
        if c.body:
            http["body"] = c.body
        elif c.raw_body:
            http["rawBody"] = base64.b64encode(c.raw_body).decode()
        attributes: dict[str, Any] = {"request": {"http": http}}
        if c.extensions:
            attributes["contextExtensions"] = dict(c.extensions)
        doc["attributes"] = attributes
    parsed_path, doc["parsed_query"] = parse_path(c.path)  # refuses a bad path, as gRPC's
    doc["parsed_path"] = parsed_path
    if not options.skip_body_parse and (
        only is None or "truncated_body" in only or "parsed_body" in only
    ):
        doc["parsed_body"], doc["truncated_body"] = parse_body(c, parsed_path, options.proto_set)
    if only is None or "version" in only:
        doc["version"] = dict(VERSION)
    return doc if only is None else project(doc, only)
