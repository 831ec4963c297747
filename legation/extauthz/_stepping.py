"""Running a check's coroutine without a task or a timer when it does not wait.

Most checks finish without suspending (a cached token, an embedded policy), and
``asyncio.wait_for`` costs a task and a timer (~25 us) per call even then. So the coroutine is
stepped once by hand (:func:`first_step`); only if it suspends does the rest run under
``asyncio.timeout`` (:func:`finish`), driven by :func:`resume` exactly as a Task would drive it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

from legation.extauthz.checks import Decision


class Waiting:
    """What :func:`first_step` returns for a coroutine that suspended: what it waits on."""

    __slots__ = ("waiting",)

    def __init__(self, waiting: Any) -> None:
        self.waiting = waiting


def first_step(coro: Coroutine[Any, Any, Decision]) -> Decision | Waiting:
    """Step ``coro`` once: its result if it finished, else :class:`Waiting` (then pass it to
    :func:`finish`). An exception it raises is raised here, the coroutine closed."""
    try:
        waiting = coro.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    except BaseException:
        coro.close()
        raise
    return Waiting(waiting)


async def finish(coro: Coroutine[Any, Any, Decision], step: Waiting, timeout: float) -> Decision:
    """Drive ``coro`` (suspended on ``step``) to its end under ``timeout``."""
    if asyncio.current_task() is None:
        # driven by hand outside a task (the HTTP call-out steps ``decide`` once): yield, so the
        # driver moves the rest into a task, where the timeout can be armed
        await asyncio.sleep(0)
    async with asyncio.timeout(timeout):
        decision: Decision = await resume(coro, step.waiting)
        return decision


async def bounded(coro: Coroutine[Any, Any, Decision], timeout: float) -> Decision:
    """``await coro`` under ``timeout``, paying for a timer only when the check really waits."""
    step = first_step(coro)
    if isinstance(step, Waiting):
        return await finish(coro, step, timeout)
    return step


async def resume(coro: Coroutine[Any, Any, Any], waiting: Any) -> Any:
    """Drive ``coro``, already stepped by hand and now blocked on ``waiting`` (what its last
    ``send`` returned), to its end, as a Task would. The HTTP call-out steps
    :meth:`AuthorizationServicer.decide` the same way."""
    while True:
        try:
            if waiting is None:
                await asyncio.sleep(0)  # a bare yield: give the loop one turn
            else:
                waiting._asyncio_future_blocking = False  # taken over, as Task.__step does
                await waiting  # the future the check is blocked on
        except GeneratorExit:  # this driver is being closed (its task destroyed): close coro too
            coro.close()
            raise
        except BaseException as e:  # cancelled (the timeout), or the future failed
            try:
                waiting = coro.throw(e)
            except StopIteration as done:
                return done.value  # type: ignore[no-any-return]
            continue
        try:
            waiting = coro.send(None)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]
