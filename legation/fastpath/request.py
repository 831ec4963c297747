"""The HTTP request Envoy's ext_authz sends (HTTP mode) -> the ``CheckRequest`` gRPC would carry.

Rebuilding the gRPC message lets :class:`~legation.extauthz.request.RequestContext` and every
check run unchanged: policies see the same input document, built by the same code. What HTTP mode
sends, and so what the document holds:

* ``method``, ``path`` (the request target with the filter's ``path_prefix`` cut off, query
  included, as Envoy received it), ``host`` (the Host header), ``headers``: ``:authority``,
  ``:method``, ``:path`` as Envoy's gRPC client puts them, plus every header Envoy passed
  (Authorization and the filter's ``allowed_headers``; ``x-envoy-auth-partial-body`` with a cut
  body), less Envoy's own hop headers (``x-envoy-internal``, ``x-envoy-expected-rq-timeout-ms``),
  the Content-Length of the call itself and Legation's route headers;
* ``body`` (``raw_body`` when it is not UTF-8) when the filter sends bodies;
* ``context_extensions``: ``policy`` and ``checks`` from
  :data:`~legation.fastpath.contract.POLICY_HEADER` and
  :data:`~legation.fastpath.contract.CHECKS_HEADER`, which the route's ``http_service``
  override sets.

Not in HTTP mode, so absent from the document: source and destination addresses and principals
(no ``spiffe_id``), the request's id, time, size, scheme and protocol, headers outside
``allowed_headers``, the metadata context.
"""

from __future__ import annotations

from collections.abc import Sequence

from envoy.service.auth.v3 import external_auth_pb2

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


class NotACheck(ValueError):
    """The request is not one Envoy's ext_authz filter would send (no path prefix, no Host)."""


def check_request(
    method: bytes,
    target: bytes,
    headers: Sequence[tuple[bytes, bytes]],
    body: bytes,
    call: dict[str, str] | None = None,
) -> external_auth_pb2.CheckRequest:
    """The CheckRequest for one call. Header names arrive as sent; they are lower-cased here
    (Envoy sends them lower-case). A name sent twice is joined with ``,`` as Envoy joins
    repeated headers in a CheckRequest. ``call`` receives the fused-call headers
    (:data:`ROUTE_HEADER`, :data:`REMOTE_ADDRESS_HEADER`), which are not the client's."""
    if not target.startswith(_PREFIX) or target[len(_PREFIX) : len(_PREFIX) + 1] not in (
        b"/",
        b"*",
    ):
        raise NotACheck(f"the request target does not start with {PATH_PREFIX}/")
    path = target[len(_PREFIX) :].decode("utf-8", "replace")
    m = method.decode("latin-1")
    request = external_auth_pb2.CheckRequest()
    attrs = request.attributes
    http = attrs.request.http
    http.method = m
    http.path = path
    out = http.headers
    host = ""
    for raw_name, raw_value in headers:
        name = raw_name.decode("latin-1").lower()
        value = raw_value.decode("utf-8", "replace")
        if name == "host":
            if host:
                raise NotACheck("more than one Host header")
            host = value
        elif name == POLICY_HEADER:
            attrs.context_extensions["policy"] = value
        elif name == CHECKS_HEADER:
            attrs.context_extensions["checks"] = value
        elif call is not None and name in (ROUTE_HEADER, REMOTE_ADDRESS_HEADER):
            if name in call:
                raise NotACheck(f"more than one {name} header")
            call[name] = value
        if name in _CALL_HEADERS:
            continue
        out[name] = f"{out[name]},{value}" if name in out else value
    if not host:
        raise NotACheck("no Host header")
    http.host = host
    out[":authority"] = host
    out[":method"] = m
    out[":path"] = path
    if body:
        try:
            http.body = body.decode()
        except UnicodeDecodeError:
            http.raw_body = body
    return request
