"""``body_redact``: mask JSON fields in responses.

```yaml
- name: body_redact
  options:
    fields: [password, authorization]     # any key with this name, at any depth (case-insensitive)
    paths: [user.ssn]                     # a dotted path from the top-level object
    mask: "***"
    content_types: [application/json]     # the default; +json types follow application/json
    max_decompressed_bytes: 8388608       # the default (8 MiB)
```

Only JSON responses need their body: the route sends response headers, and when the content type
is JSON the filter asks for the buffered body with ``mode_override``, so other responses stream
through untouched. JSON is a type in ``content_types`` or, while ``application/json`` is listed,
any type with the ``+json`` structured suffix (``application/problem+json``,
``application/vnd.api+json``). A body that is not valid JSON is left as it is; a rewritten body
gets its ``content-length`` updated (the SDK does that for every replaced buffered body).

Compressed JSON is redacted too, or refused, never passed unredacted:

* ``content-encoding: gzip`` (``x-gzip``) or ``deflate`` (zlib or raw): the body is inflated, at
  most ``max_decompressed_bytes`` of output (a zip bomb stops there, whatever its ratio),
  redacted, and compressed again in the same encoding;
* any other encoding (``br``, ``zstd``, several codings in a row), a body that does not inflate
  cleanly, or one that inflates past the bound: the client gets ``502`` (details
  ``legation_redact_refused``) instead of a body the filter could not read (fail closed).
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Mapping
from typing import Any

from pydantic import Field, model_validator

from legation.extproc.exchange import Exchange
from legation.extproc.filters._options import Options, validate_options
from legation.extproc.sdk import BodyMode, Filter, Phase


class BodyRedactOptions(Options):
    fields: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()
    mask: str = "***"
    content_types: tuple[str, ...] = ("application/json",)
    max_decompressed_bytes: int = Field(default=8 * 1024 * 1024, gt=0)

    @model_validator(mode="after")
    def _something(self) -> BodyRedactOptions:
        if not self.fields and not self.paths:
            raise ValueError("needs at least one of fields, paths")
        for p in self.paths:
            if not p or any(not part for part in p.split(".")):
                raise ValueError(f"path {p!r} has an empty segment")
        return self


class BodyRedact(Filter):
    name = "body_redact"
    inline = True  # plain, non-blocking hooks bounded by the message: no thread hop
    phases = frozenset({Phase.RESPONSE_HEADERS})
    body_mode = BodyMode.BUFFERED

    def __init__(self, options: BodyRedactOptions) -> None:
        self.options = options
        self._fields = frozenset(f.lower() for f in options.fields)
        self._paths = tuple(tuple(p.split(".")) for p in options.paths)

    def is_json(self, content_type: str) -> bool:
        ctype = content_type.split(";", 1)[0].strip().lower()
        types = self.options.content_types
        return ctype in types or (ctype.endswith("+json") and "application/json" in types)

    def on_response_headers(self, ex: Exchange) -> None:
        if ex.end_of_stream or not self.is_json(ex.response_headers.get("content-type", "")):
            return
        if _coding(ex.response_headers) not in _READABLE:
            _refuse(ex)  # cannot read it, so cannot redact it: refuse it now, unbuffered
            return
        ex.want_body(Phase.RESPONSE_BODY, BodyMode.BUFFERED)

    def on_response_body(self, ex: Exchange) -> None:
        coding = _coding(ex.response_headers)
        if coding not in _READABLE:
            _refuse(ex)
            return
        body, wbits = ex.body, 0
        if coding:
            inflated, wbits = _inflate(ex.body, coding, self.options.max_decompressed_bytes)
            if inflated is None:
                _refuse(ex)
                return
            body = inflated
        try:
            doc = json.loads(body)
        except (ValueError, UnicodeDecodeError, RecursionError):
            return
        if self.redact(doc):
            out = json.dumps(doc, separators=(",", ":")).encode()
            ex.replace_body(_deflate(out, wbits) if coding else out)

    def redact(self, doc: Any) -> bool:
        """Mask in place; True when something was masked."""
        changed = self._walk(doc) if self._fields else False
        for path in self._paths:
            node = doc
            for key in path[:-1]:
                node = node.get(key) if isinstance(node, dict) else None
            if isinstance(node, dict) and path[-1] in node:
                node[path[-1]] = self.options.mask
                changed = True
        return changed

    def _walk(self, node: Any) -> bool:
        changed = False
        if isinstance(node, dict):
            for key, value in node.items():
                if key.lower() in self._fields:
                    node[key] = self.options.mask
                    changed = True
                elif isinstance(value, dict | list):
                    changed |= self._walk(value)
        elif isinstance(node, list):
            for item in node:
                changed |= self._walk(item)
        return changed


_READABLE = frozenset({"", "gzip", "deflate"})


def _coding(headers: Mapping[str, str]) -> str:
    """The one content coding to undo: "" (none), gzip, deflate, or what it is when unreadable
    (several codings in a row are returned joined, so they are never readable)."""
    codings = [c.strip().lower() for c in headers.get("content-encoding", "").split(",")]
    codings = [("gzip" if c == "x-gzip" else c) for c in codings if c and c != "identity"]
    return ",".join(codings)


def _inflate(data: bytes, coding: str, limit: int) -> tuple[bytes | None, int]:
    """The inflated body (None when it does not inflate cleanly within ``limit`` bytes) and the
    zlib ``wbits`` that read it."""
    for wbits in (31,) if coding == "gzip" else (15, -15):  # deflate: zlib, or raw in the wild
        inflater = zlib.decompressobj(wbits)
        try:
            out = inflater.decompress(data, limit + 1)
        except zlib.error:
            continue
        if len(out) > limit or inflater.unconsumed_tail or not inflater.eof:
            return None, wbits  # over the bound, or truncated
        if inflater.unused_data:
            return None, wbits  # a second gzip member or trailing bytes: not read, not passed
        return out, wbits
    return None, 0


def _deflate(data: bytes, wbits: int) -> bytes:
    if wbits == 31:
        return gzip.compress(data, mtime=0)
    compressor = zlib.compressobj(wbits=wbits)
    return compressor.compress(data) + compressor.flush()


def _refuse(ex: Exchange) -> None:
    ex.respond(
        502,
        "bad gateway\n",
        headers={"content-type": "text/plain"},
        details="legation_redact_refused",
    )


class BodyRedactFactory:
    name = "body_redact"

    def validate(self, raw: Mapping[str, Any]) -> BodyRedactOptions:
        return validate_options(BodyRedactOptions, raw)

    def create(self, config: BodyRedactOptions) -> BodyRedact:
        return BodyRedact(config)
