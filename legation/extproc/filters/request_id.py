"""``request_id``: a correlation id on every request, echoed on the response.

```yaml
- name: request_id
  options: {header: x-correlation-id, trust_incoming: true, response: true, metadata: true}
```

A well-formed incoming id (``[A-Za-z0-9._-]{1,128}``) is kept when ``trust_incoming``; anything
else is replaced with a fresh UUID4, so a client cannot inject arbitrary text into logs. The id is
also set as dynamic metadata ``legation.extproc: {request_id: ...}`` for access logs.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
from typing import Any

from pydantic import Field

from legation.extproc.exchange import Exchange
from legation.extproc.filters._options import Options, validate_options
from legation.extproc.sdk import Filter, Phase

_WELL_FORMED = re.compile(r"[A-Za-z0-9._-]{1,128}")


class RequestIdOptions(Options):
    header: str = Field(default="x-correlation-id", pattern=r"^[A-Za-z0-9-]+$")
    trust_incoming: bool = True
    response: bool = True
    """Copy the id onto the response (adds the response-headers phase)."""
    metadata: bool = True


class RequestId(Filter):
    name = "request_id"
    inline = True  # plain, non-blocking hooks bounded by the message: no thread hop

    def __init__(self, options: RequestIdOptions) -> None:
        self.options = options
        self._header = options.header.lower()
        phases = {Phase.REQUEST_HEADERS}
        if options.response:
            phases.add(Phase.RESPONSE_HEADERS)
        self.phases = frozenset(phases)

    def on_request_headers(self, ex: Exchange) -> None:
        incoming = ex.request_headers.get(self._header)
        if incoming and self.options.trust_incoming and _WELL_FORMED.fullmatch(incoming):
            rid = incoming
        else:
            rid = uuid.uuid4().hex
            ex.set_header(self._header, rid)
        ex.state["request_id"] = rid
        if self.options.metadata:
            ex.set_metadata("request_id", rid)

    def on_response_headers(self, ex: Exchange) -> None:
        rid = ex.state.get("request_id")
        if rid is not None:
            ex.set_header(self._header, rid)


class RequestIdFactory:
    name = "request_id"

    def validate(self, raw: Mapping[str, Any]) -> RequestIdOptions:
        return validate_options(RequestIdOptions, raw)

    def create(self, config: RequestIdOptions) -> RequestId:
        return RequestId(config)
