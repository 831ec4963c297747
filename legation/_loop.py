"""The event loop a request-path service process runs on: uvloop, unless told otherwise.

Measured through the real Envoy with both services loaded at the same time (bench/floor.py's
``--at-once`` pairs), a grpc.aio server does the same calls for 11-13 % less CPU on uvloop than
on asyncio's default loop, for each of ext_authz, rate limit and ext_proc; the HTTP call-out
was chosen on uvloop too (bench/http_callout.py). ``legation serve`` (and so every service
``legation up`` starts) runs its service on the loop :func:`run` picks.

``LEGATION_EVENT_LOOP=asyncio`` runs asyncio's own loop instead (to rule the loop out when
debugging); ``uvloop`` (the default) falls back to asyncio's loop where uvloop is not installed
(it is a dependency except on Windows). Any other value is refused, naming the variable.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine
from typing import Any, TypeVar

from legation.errors import ConfigError

__all__ = ["ENV", "choice", "run", "running"]

ENV = "LEGATION_EVENT_LOOP"
_CHOICES = ("uvloop", "asyncio")
_T = TypeVar("_T")


def choice(environ: dict[str, str] | os._Environ[str] | None = None) -> str:
    """The loop :func:`run` will use: ``uvloop`` or ``asyncio``. Raises :class:`ConfigError`
    naming :data:`ENV` for a value it does not know (checked before anything starts)."""
    env = os.environ if environ is None else environ
    wanted = env.get(ENV, "uvloop").strip().lower() or "uvloop"
    if wanted not in _CHOICES:
        raise ConfigError(
            f"{ENV}: expected one of {', '.join(_CHOICES)}, got {env.get(ENV)!r}",
            code="invalid_event_loop",
        )
    if wanted == "uvloop":
        try:
            import uvloop  # noqa: F401
        except ImportError:
            return "asyncio"
    return wanted


def run(main: Coroutine[Any, Any, _T]) -> _T:
    """``asyncio.run(main)`` on the loop :func:`choice` picks (``main`` is closed unrun when
    the choice is refused)."""
    try:
        loop = choice()
    except BaseException:
        main.close()
        raise
    if loop == "uvloop":
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(main)
    return asyncio.run(main)


def running() -> str:
    """The running loop's kind, as :func:`choice` names it (``uvloop`` or ``asyncio``): what a
    service prints when it starts, so its log says which loop it runs on."""
    module = type(asyncio.get_running_loop()).__module__
    return "uvloop" if module.split(".")[0] == "uvloop" else "asyncio"
