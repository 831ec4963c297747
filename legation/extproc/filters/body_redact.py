"""``body_redact``: mask JSON fields in responses.

```yaml
- name: body_redact
  options:
    fields: [password, authorization]     # any key with this name, at any depth (case-insensitive)
    paths: [user.ssn]                     # a dotted path from the top-level object
    mask: "***"
```

Only JSON responses need their body: the route sends response headers, and when the content type
is JSON the filter asks for the buffered body with ``mode_override``, so other responses stream
through untouched. A body that is not valid JSON is left as it is; a rewritten body gets its
``content-length`` updated (the SDK does that for every replaced buffered body).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from pydantic import model_validator

from legation.extproc.exchange import Exchange
from legation.extproc.filters._options import Options, validate_options
from legation.extproc.sdk import BodyMode, Filter, Phase


class BodyRedactOptions(Options):
    fields: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()
    mask: str = "***"
    content_types: tuple[str, ...] = ("application/json",)

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
    phases = frozenset({Phase.RESPONSE_HEADERS})
    body_mode = BodyMode.BUFFERED

    def __init__(self, options: BodyRedactOptions) -> None:
        self.options = options
        self._fields = frozenset(f.lower() for f in options.fields)
        self._paths = tuple(tuple(p.split(".")) for p in options.paths)

    def on_response_headers(self, ex: Exchange) -> None:
        ctype = ex.response_headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if ctype in self.options.content_types and not ex.end_of_stream:
            ex.want_body(Phase.RESPONSE_BODY, BodyMode.BUFFERED)

    def on_response_body(self, ex: Exchange) -> None:
        try:
            doc = json.loads(ex.body)
        except (ValueError, UnicodeDecodeError):
            return
        if self.redact(doc):
            ex.replace_body(json.dumps(doc, separators=(",", ":")).encode())

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


class BodyRedactFactory:
    name = "body_redact"

    def validate(self, raw: Mapping[str, Any]) -> BodyRedactOptions:
        return validate_options(BodyRedactOptions, raw)

    def create(self, config: BodyRedactOptions) -> BodyRedact:
        return BodyRedact(config)
