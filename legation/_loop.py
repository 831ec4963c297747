"""The event loop a request-path service process runs on: uvloop, unless told otherwise.

Measured through the real Envoy with both services loaded at the same time (bench/floor.py's
``--at-once`` pairs), a grpc.aio server does the same calls for 11-13 % less CPU on uvloop than
on asyncio's default loop, for each of ext_authz, rate limit and ext_proc; the HTTP call-out
was chosen on uvloop too (bench/http_callout.py). Every ``legation serve`` process (so the
control plane and every service ``legation up`` starts) runs on the loop :func:`run` picks;
``legation up``'s own supervisor stays on asyncio's loop (it starts its children through
asyncio's subprocess support, which uvloop implements with a spawn that runs at-fork hooks).

``LEGATION_EVENT_LOOP=asyncio`` runs asyncio's own loop instead (to rule the loop out when
debugging); ``uvloop`` (the default) falls back to asyncio's loop where uvloop is not installed
(it is a dependency except on Windows). Any other value is refused, naming the variable.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from legation.errors import ConfigError

__all__ = ["ENV", "choice", "new_event_loop", "run", "running"]

ENV = "LEGATION_EVENT_LOOP"
_CHOICES = ("uvloop", "asyncio")
_T = TypeVar("_T")


def choice(environ: dict[str, str] | os._Environ[str] | None = None) -> str:
    """The loop :func:`run` will use: ``uvloop`` or ``asyncio``. Raises :class:`ConfigError`
    naming :data:`ENV` for a value it does not know (checked before anything starts)."""
    env = os.environ if environ is None else environ
    raw = env.get(ENV, "")
    wanted = raw.strip(" \t\r\n").lower() or "uvloop"  # ASCII blanks only, then exact names
    if wanted not in _CHOICES:
        shown = repr(raw) if len(raw) <= 64 else f"{raw[:64]!r}... ({len(raw)} characters)"
        raise ConfigError(
            f"{ENV}: expected one of {', '.join(_CHOICES)}, got {shown}",
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
        factory = _factory(choice())
    except BaseException:
        main.close()
        raise
    with asyncio.Runner(loop_factory=factory) as runner:  # no factory: asyncio.run's own
        return runner.run(main)


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A new loop of the kind :func:`choice` picks, for a loop run by hand (a thread of its
    own: the tests run their in-process services on one, as ``legation serve`` would)."""
    return (_factory(choice()) or asyncio.new_event_loop)()


def _factory(kind: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop factory for ``uvloop``; None (asyncio's own) for ``asyncio``."""
    if kind == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return None


def running() -> str:
    """The running loop's kind, as :func:`choice` names it (``uvloop`` or ``asyncio``): what a
    service prints when it starts, so its log says which loop it runs on."""
    module = type(asyncio.get_running_loop()).__module__
    return "uvloop" if module.split(".")[0] == "uvloop" else "asyncio"
