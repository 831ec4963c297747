"""Small filters used by the integration tests (registered at run time, not by entry point)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Mapping
from typing import Any

from legation.extproc.exchange import Exchange
from legation.extproc.sdk import BodyMode, Filter, Phase


class _Factory:
    def __init__(self, name: str, cls: type[Filter]) -> None:
        self.name = name
        self._cls = cls

    def validate(self, raw: Mapping[str, Any]) -> dict[str, Any]:
        return dict(raw)

    def create(self, config: dict[str, Any]) -> Filter:
        return self._cls()


class Raises(Filter):
    name = "t_raise"

    def on_request_headers(self, ex: Exchange) -> None:
        raise RuntimeError("boom in a test filter")


class Slow(Filter):
    name = "t_slow"
    cancelled = 0

    async def on_request_headers(self, ex: Exchange) -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            type(self).cancelled += 1
            raise


class Blocks(Filter):
    """A plain hook that blocks (as a filter doing blocking I/O would) until released."""

    name = "t_block"
    entered = threading.Event()
    release = threading.Event()
    returned = 0

    def on_request_headers(self, ex: Exchange) -> None:
        type(self).entered.set()
        type(self).release.wait(15)
        ex.set_header("x-late", "too-late")  # after the deadline: must never reach upstream
        type(self).returned += 1


class UpperStreamed(Filter):
    """Upper-cases every request body chunk as it streams (same length)."""

    name = "t_upper"
    phases = frozenset({Phase.REQUEST_HEADERS, Phase.REQUEST_BODY})
    body_mode = BodyMode.STREAMED

    def on_request_body(self, ex: Exchange) -> None:
        ex.replace_body(ex.body.upper())


class WrapBuffered(Filter):
    """Replaces the whole buffered request body with a longer one."""

    name = "t_wrap"
    phases = frozenset({Phase.REQUEST_HEADERS, Phase.REQUEST_BODY})
    body_mode = BodyMode.BUFFERED

    def on_request_body(self, ex: Exchange) -> None:
        ex.replace_body(b"<wrapped>" + ex.body + b"</wrapped>")


class Answers(Filter):
    """403 when x-deny is sent, a redirect when x-redirect is; dynamic metadata otherwise."""

    name = "t_answer"

    def on_request_headers(self, ex: Exchange) -> None:
        if "x-deny" in ex.headers:
            ex.respond(403, "denied by test\n", headers={"x-denied-by": "t_answer"})
        elif "x-redirect" in ex.headers:
            ex.redirect(ex.headers["x-redirect"])
        else:
            ex.set_metadata("flag", "on")


FACTORIES = [
    _Factory(cls.name, cls) for cls in (Raises, Slow, Blocks, UpperStreamed, WrapBuffered, Answers)
]
