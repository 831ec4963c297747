"""``legation serve <kind> --workers N``: N forked processes (worker i on port + 100 i, or all
on one port with ``--reuse-port``).

The parent forks the workers, forwards SIGINT/SIGTERM to them and waits for all; its exit status
is the first non-zero one of theirs (a worker stopped by the signal the parent forwarded counts
as a clean stop). Each worker runs ``serve(index)`` and exits with its return code, never
returning into the parent's code.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from typing import Any

__all__ = ["run_workers"]


def run_workers(
    count: int, serve: Callable[[int], int], *, after_fork: Callable[[], Any] | None = None
) -> int:
    """Fork ``count`` workers running ``serve(index)``; wait for all; their combined status.
    ``after_fork`` runs in the parent once every worker is forked (threads it starts are never
    inherited by a worker)."""
    children = []
    for index in range(count):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = serve(index)
            finally:
                os._exit(code)
        children.append(pid)

    asked: set[int] = set()

    def forward(signum: int, _frame: Any) -> None:
        asked.add(signum)
        for child in children:
            try:
                os.kill(child, signum)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    if after_fork is not None:
        after_fork()
    status = 0
    for child in children:
        _, code = os.waitpid(child, 0)
        exit_code = os.waitstatus_to_exitcode(code)
        if -exit_code in asked:
            exit_code = 0  # stopped by the signal we forwarded before it set up its own handler
        status = status or exit_code
    return status
