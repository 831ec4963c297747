"""CheckRequest -> the policy input document that opa-envoy-plugin builds.

The document is ``{"attributes": <CheckRequest.attributes>, "parsed_path": [...],
"parsed_query": {...}, "parsed_body": ..., "truncated_body": bool, "version": {...},
"source_principal": "..."}``, built by opa-envoy-plugin's rules (``attributes`` by
:mod:`legation.extauthz._protomap`, the body by :mod:`legation.extauthz._body`), so policies
written for opa-envoy-plugin run unchanged. Legation adds ``jwt`` (the verified claims, once a
``jwt`` check has run) and ``spiffe_id`` (the peer's SPIFFE id when the connection used mTLS).

The document is built lazily, on first use: a route that only checks a JWT never pays for it.
A caller that knows which parts of the document it reads (the embedded Rego engine, see
:mod:`legation.extauthz._inputrefs`) passes an :data:`InputPaths` tree and gets only those parts:
the parts it leaves out are not built (a body that is never read is never parsed).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from legation.extauthz._body import ProtoSet
from legation.extauthz._body import parse as parse_body_of
from legation.extauthz._protomap import protomap
from legation.extauthz.errors import AuthzError

VERSION = {"ext_authz": "v3", "encoding": "protojson"}

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

    __slots__ = (
        "_input",
        "claims",
        "decision_id",
        "extensions",
        "headers",
        "jwt_provider",
        "options",
        "request",
    )

    def __init__(self, request: Any, options: InputOptions | None = None) -> None:
        self.request = request
        self.options = options or DEFAULT_OPTIONS
        attributes = request.attributes
        # protobuf maps (a dict over HTTP): lower-case names, like Envoy sends
        self.headers: Any = attributes.request.http.headers
        self.extensions: Any = attributes.context_extensions
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
            doc = self._build(only)
        else:
            if self._input is None:
                self._input = self._build(None)
            doc = self._input
        if self.claims is not None and (only is None or "jwt" in only):
            jwt = {"provider": self.jwt_provider, "claims": self.claims}
            doc["jwt"] = jwt if only is None else project(jwt, only["jwt"])
        if only is None or "spiffe_id" in only:
            spiffe = self.spiffe_id
            if spiffe:
                doc["spiffe_id"] = spiffe
        return doc

    def body_size(self) -> int:
        """Characters of the body plus bytes of the raw body (what a cache key would repeat)."""
        http = self.request.attributes.request.http
        return len(http.body) + len(http.raw_body)

    def _build(self, only: InputPaths | None) -> dict[str, Any]:
        return build_input(self.request, only, self.options)


@dataclass(frozen=True, kw_only=True)
class InputOptions:
    """How the input document is built, as opa-envoy-plugin's plugin options:
    ``skip_body_parse`` (its ``skip_request_body_parse``: no ``parsed_body`` and no
    ``truncated_body`` keys at all) and ``proto_set`` (its ``proto_descriptor``: gRPC bodies
    decoded, see :mod:`legation.extauthz._body`)."""

    skip_body_parse: bool = False
    proto_set: ProtoSet | None = None


DEFAULT_OPTIONS = InputOptions()


def build_input(
    request: Any, only: InputPaths | None = None, options: InputOptions = DEFAULT_OPTIONS
) -> dict[str, Any]:
    """The document for ``request``; with ``only``, just those parts (see :func:`project`).
    With ``only``, the parts it leaves out are not built at all.

    As opa-envoy-plugin: ``attributes`` is the CheckRequest's populated fields
    (:mod:`legation.extauthz._protomap`: absent when empty, numbers as numbers);
    ``parsed_path``, ``parsed_query`` and ``version`` are always there; ``parsed_body`` (null
    when the body is not parsed) and ``truncated_body`` unless body parsing is skipped;
    ``source_principal`` when the peer has one."""
    http = request.attributes.request.http
    doc: dict[str, Any] = {}
    if (only is None or "attributes" in only) and request.HasField("attributes"):
        doc["attributes"] = protomap(request.attributes, _sub(only, "attributes"))
    want_body = not options.skip_body_parse and (
        only is None or "truncated_body" in only or "parsed_body" in only
    )
    parsed_path, doc["parsed_query"] = parse_path(http.path)  # cheap; refuses a bad path
    doc["parsed_path"] = parsed_path
    if want_body:
        doc["parsed_body"], doc["truncated_body"] = parse_body_of(
            http, parsed_path, options.proto_set
        )
    if only is None or "version" in only:
        doc["version"] = dict(VERSION)
    principal = request.attributes.source.principal
    if principal and (only is None or "source_principal" in only):
        doc["source_principal"] = principal
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
        raise AuthzError(
            f"the request path cannot be parsed: {e}", code="malformed_path", status=400
        ) from None
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
