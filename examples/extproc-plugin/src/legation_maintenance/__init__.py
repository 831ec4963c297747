"""``maintenance``: answer 503 on path prefixes under maintenance, with a bypass header."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import Field

from legation.extproc.exchange import Exchange
from legation.extproc.filters._options import Options, validate_options
from legation.extproc.sdk import Filter, Phase


class MaintenanceOptions(Options):
    paths: tuple[str, ...] = Field(min_length=1)
    retry_after: int = Field(default=60, gt=0)
    bypass_header: str | None = None
    message: str = "down for maintenance\n"


class Maintenance(Filter):
    name = "maintenance"
    phases = frozenset({Phase.REQUEST_HEADERS})

    def __init__(self, options: MaintenanceOptions) -> None:
        self.options = options
        self._bypass = options.bypass_header.lower() if options.bypass_header else None

    def on_request_headers(self, ex: Exchange) -> None:
        path = ex.request_headers.get(":path", "/")
        if not path.startswith(self.options.paths):
            return
        if self._bypass is not None and self._bypass in ex.request_headers:
            ex.set_metadata("maintenance_bypassed", True)
            return
        ex.respond(
            503,
            self.options.message,
            headers={"retry-after": str(self.options.retry_after), "content-type": "text/plain"},
            details="maintenance",
        )


class MaintenanceFactory:
    name = "maintenance"

    def validate(self, raw: Mapping[str, Any]) -> MaintenanceOptions:
        return validate_options(MaintenanceOptions, raw)

    def create(self, config: MaintenanceOptions) -> Maintenance:
        return Maintenance(config)
