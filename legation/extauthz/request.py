"""CheckRequest -> the policy input document that opa-envoy-plugin builds.

The document is ``{"attributes": <CheckRequest.attributes as protojson>, "parsed_path": [...],
"parsed_query": {...}, "parsed_body": ..., "truncated_body": bool, "version": {...}}``, so policies
written for opa-envoy-plugin run unchanged. Legation adds ``jwt`` (the verified claims, once a
``jwt`` check has run) and ``spiffe_id`` (the peer's SPIFFE id when the connection used mTLS).

The document is built lazily, on first use: a route that only checks a JWT never pays for it.
The common fields are copied by hand (protojson names, camelCase) because ``MessageToDict`` on a
whole CheckRequest costs ~75 us, a large share of the per-call budget. A caller that knows which
parts of the document it reads (the embedded Rego engine, see :mod:`legation.extauthz._inputrefs`)
passes an :data:`InputPaths` tree and gets only those parts: handing each node to the engine costs
a few microseconds, so the whole document would cost more than evaluating the policy.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
from collections.abc import Mapping
from typing import Any

from google.protobuf.json_format import MessageToDict

from legation.extauthz.errors import AuthzError

_VERSION = {"ext_authz": "v3", "encoding": "protojson"}

# A projection of the input document: key -> sub-tree; an empty mapping means "all of it".
InputPaths = Mapping[str, "InputPaths"]


def _seed() -> None:
    global _id_prefix, _id_counter
    _id_prefix = os.urandom(8).hex()
    _id_counter = itertools.count()


_id_prefix = ""
_id_counter = itertools.count()
_seed()
os.register_at_fork(after_in_child=_seed)  # forked workers must not repeat each other's ids


def new_decision_id() -> str:
    """32 hex digits, unique per process (random prefix + counter): uuid4 costs a syscall."""
    return f"{_id_prefix}{next(_id_counter):016x}"


class RequestContext:
    """One Check call: the raw request, what earlier checks learned, and the lazy input."""

    __slots__ = ("_input", "claims", "decision_id", "extensions", "headers", "jwt_provider",
                 "request")

    def __init__(self, request: Any) -> None:
        self.request = request
        http = request.attributes.request.http
        self.headers: Any = http.headers  # a protobuf map: lower-case names, like Envoy sends
        self.extensions: Any = request.attributes.context_extensions
        self.claims: dict[str, Any] | None = None
        self.jwt_provider: str | None = None
        self.decision_id = new_decision_id()
        self._input: dict[str, Any] | None = None

    @property
    def method(self) -> str:
        return str(self.request.attributes.request.http.method)

    @property
    def path(self) -> str:
        return str(self.request.attributes.request.http.path)

    @property
    def spiffe_id(self) -> str | None:
        principal = self.request.attributes.source.principal
        return principal if principal.startswith("spiffe://") else None

    def input(self, only: InputPaths | None = None) -> dict[str, Any]:
        """The policy input document (built once per request), or only the parts in ``only``."""
        if only is not None:
            doc = build_input(self.request, only)
        else:
            if self._input is None:
                self._input = build_input(self.request)
            doc = self._input
        if self.claims is not None and (only is None or "jwt" in only):
            jwt = {"provider": self.jwt_provider, "claims": self.claims}
            doc["jwt"] = jwt if only is None else project(jwt, only["jwt"])
        if only is None or "spiffe_id" in only:
            spiffe = self.spiffe_id
            if spiffe:
                doc["spiffe_id"] = spiffe
        return doc


def build_input(request: Any, only: InputPaths | None = None) -> dict[str, Any]:
    """The document for ``request``; with ``only``, just those parts (see :func:`project`).
    With ``only``, the parts it leaves out are not built at all."""
    attrs = request.attributes
    http = attrs.request.http
    doc: dict[str, Any] = {}
    if only is None or "attributes" in only:
        doc["attributes"] = _attributes(attrs, http, _sub(only, "attributes"))
    if only is None or "parsed_path" in only or "parsed_query" in only:
        doc["parsed_path"], doc["parsed_query"] = parse_path(http.path)
    if only is None or "version" in only:
        doc["version"] = dict(_VERSION)
    if only is None or "truncated_body" in only or "parsed_body" in only:
        body, truncated = _body(http)
        doc["truncated_body"] = truncated
        if body and not truncated:
            parsed = parse_body(body, http.headers.get("content-type", ""))
            if parsed is not None:
                doc["parsed_body"] = parsed
    return doc if only is None else project(doc, only)


def _sub(only: InputPaths | None, key: str) -> InputPaths | None:
    """The projection under ``key``; None (everything) when ``only`` keeps all of it."""
    if not only:
        return None
    sub = only[key]
    return sub or None


def project(value: Any, only: InputPaths) -> Any:
    """The parts of ``value`` named by ``only``; an empty tree keeps the whole value. A policy
    that reads ``input.a.b`` sees exactly what it would see in the whole document."""
    if not only or not isinstance(value, dict):
        return value
    return {k: project(value[k], sub) for k, sub in only.items() if k in value}


def _attributes(attrs: Any, http: Any, only: InputPaths | None = None) -> dict[str, Any]:
    """``attributes`` as protojson; with ``only``, just the branches it names (the caller
    projects what is below them)."""
    attributes: dict[str, Any] = {}
    if only is None or "source" in only:
        attributes["source"] = _peer(attrs.source)
    if only is None or "destination" in only:
        attributes["destination"] = _peer(attrs.destination)
    if only is None or "request" in only:
        wanted = _sub(only, "request")
        request_doc: dict[str, Any] = {}
        if wanted is None or "http" in wanted:
            request_doc["http"] = _http(http, _sub(wanted, "http"))
        if (wanted is None or "time" in wanted) and attrs.request.HasField("time"):
            request_doc["time"] = attrs.request.time.ToJsonString()
        attributes["request"] = request_doc
    if only is None or "contextExtensions" in only:
        attributes["contextExtensions"] = dict(attrs.context_extensions)
    if (only is None or "metadataContext" in only) and attrs.HasField("metadata_context"):
        attributes["metadataContext"] = MessageToDict(attrs.metadata_context)
    if ((only is None or "routeMetadataContext" in only)
            and attrs.HasField("route_metadata_context")):
        attributes["routeMetadataContext"] = MessageToDict(attrs.route_metadata_context)
    return attributes


_HTTP_ALWAYS = ("id", "method", "path", "host", "scheme", "protocol")  # even when empty


def _http(http: Any, only: InputPaths | None) -> dict[str, Any]:
    if only is not None:  # a policy reads a few fields: fetch just those
        out = {}
        for key in only:
            if key in _HTTP_ALWAYS:
                out[key] = getattr(http, key)
            elif key == "headers":
                out[key] = dict(http.headers)
            else:
                out.update(_http_optional(http, key))
        return out
    http_doc: dict[str, Any] = {
        "id": http.id,
        "method": http.method,
        "headers": dict(http.headers),
        "path": http.path,
        "host": http.host,
        "scheme": http.scheme,
        "protocol": http.protocol,
    }
    for key in ("query", "fragment", "size", "body", "rawBody"):
        http_doc.update(_http_optional(http, key))
    return http_doc


def _http_optional(http: Any, key: str) -> dict[str, Any]:
    """The fields protojson leaves out when empty: ``{key: value}`` or ``{}``."""
    if key == "query" and http.query:
        return {"query": http.query}
    if key == "fragment" and http.fragment:
        return {"fragment": http.fragment}
    if key == "size" and http.size:
        return {"size": str(http.size)}  # protojson renders int64 as a string
    if key == "body" and http.body:
        return {"body": http.body}
    if key == "rawBody" and http.raw_body:
        return {"rawBody": base64.b64encode(http.raw_body).decode()}
    return {}


def _peer(peer: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if peer.HasField("address"):
        sock = peer.address.socket_address
        out["address"] = {"socketAddress": {"address": sock.address, "portValue": sock.port_value}}
    if peer.principal:
        out["principal"] = peer.principal
    if peer.certificate:
        out["certificate"] = peer.certificate
    if peer.labels:
        out["labels"] = dict(peer.labels)
    return out


# Go's url.ParseQuery refuses a query with this many '&' (more than 10,000 parameters, its default
# GODEBUG urlmaxqueryparams), and opa-envoy-plugin then refuses the request.
MAX_QUERY_PARAMS = 10_000
_HEX = frozenset(b"0123456789abcdefABCDEF")


def parse_path(path: str) -> tuple[list[str], dict[str, list[str]]]:
    """``parsed_path`` and ``parsed_query`` exactly as opa-envoy-plugin builds them (since its
    2026 fix for ``//admin``): the request target is cut at the first ``?``; the path part is
    percent-decoded (``%2F`` becomes a separator), its leading slashes dropped and the rest split
    on ``/``, keeping empty and dot segments as they are (``/a//b/../c`` -> ``["a", "", "b",
    "..", "c"]``); the query is parsed by :func:`parse_query`. Envoy sends the target with no
    normalisation unless the listener asks for it, so a deny rule must not assume a clean path.

    A malformed escape (``%zz``, a lone ``%``), a ``;`` in the query or too many parameters is
    :class:`AuthzError` ``malformed_path`` (400), where opa-envoy-plugin fails the request: a
    policy never decides on a path it cannot read. Decoded bytes that are not UTF-8 become U+FFFD.
    """
    raw_path, _, raw_query = path.partition("?")
    try:
        decoded = unescape(raw_path, plus=False)
        query = parse_query(raw_query)
    except ValueError as e:
        raise AuthzError(f"the request path cannot be parsed: {e}", code="malformed_path",
                         status=400) from None
    return decoded.lstrip("/").split("/"), query


def parse_query(raw: str, *, strict: bool = True) -> dict[str, list[str]]:
    """``a=1&a=2&b&c=x+y`` -> ``{"a": ["1", "2"], "b": [""], "c": ["x y"]}``, as Go's
    ``url.ParseQuery``: pairs split on ``&`` only, empty pairs skipped, ``+`` is a space, values
    of a repeated key kept in order. ``strict`` raises ValueError on a ``;`` or a malformed
    escape (as opa-envoy-plugin does); otherwise such pairs are skipped, as Go skips them."""
    if raw.count("&") >= MAX_QUERY_PARAMS:
        raise ValueError(f"more than {MAX_QUERY_PARAMS} query parameters")
    out: dict[str, list[str]] = {}
    for pair in raw.split("&"):
        if not pair:
            continue
        try:
            if ";" in pair:
                raise ValueError("';' is not a query separator")
            key, _, value = pair.partition("=")
            key, value = unescape(key, plus=True), unescape(value, plus=True)
        except ValueError:
            if strict:
                raise
            continue
        out.setdefault(key, []).append(value)
    return out


def unescape(raw: str, *, plus: bool) -> str:
    """Percent-decoding as Go's ``url.PathUnescape`` (``plus=False``) and ``url.QueryUnescape``
    (``plus=True``: ``+`` is a space): every ``%`` must start two hex digits, else ValueError.
    The decoded bytes are read as UTF-8, invalid sequences as U+FFFD."""
    if plus and "+" in raw:
        raw = raw.replace("+", " ")
    if "%" not in raw:
        return raw
    pieces = raw.encode().split(b"%")
    out = [pieces[0]]
    for piece in pieces[1:]:
        if len(piece) < 2 or piece[0] not in _HEX or piece[1] not in _HEX:
            raise ValueError(f"invalid escape %{piece[:2].decode(errors='replace')!r}")
        out.append(bytes((int(piece[:2], 16),)))
        out.append(piece[2:])
    return b"".join(out).decode("utf-8", "replace")


def _body(http: Any) -> tuple[bytes, bool]:
    body = http.raw_body or http.body.encode()
    if http.headers.get("x-envoy-auth-partial-body") == "true":
        return body, True
    length = http.headers.get("content-length")
    if length is not None:
        try:
            return body, int(length) > len(body)
        except ValueError:
            raise AuthzError("content-length header is not a number", code="malformed_body",
                             status=400) from None
    return body, False


def parse_body(body: bytes, content_type: str) -> Any:
    """JSON and form bodies are parsed; other types are left to the policy (``body``)."""
    media = content_type.split(";", 1)[0].strip().lower()
    if media == "application/json" or media.endswith("+json"):
        try:
            return json.loads(body)
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise AuthzError("request body is not valid JSON", code="malformed_body",
                             status=400) from None
    if media == "application/x-www-form-urlencoded":
        try:
            return parse_query(body.decode())  # url.ParseQuery, as opa-envoy-plugin
        except (UnicodeDecodeError, ValueError):
            raise AuthzError("form body is not valid UTF-8 form data", code="malformed_body",
                             status=400) from None
    return None
