"""``legation top``: the golden metrics of a running stack, live (like ``linkerd viz top``).

It reads the control plane's ``/status`` (its ``golden`` part: the access-log service's sliding
windows) every ``--interval`` seconds and redraws one table per scope (routes, source ->
destination service pairs, proxies): request rate, success rate, p50/p90/p99. On a terminal the
screen is redrawn in place until Ctrl-C; ``--once``, or output that is not a terminal, prints the
tables once and exits.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request
from typing import Any

from legation.observe.render import render

NO_SERVICE = (
    "no golden metrics: the mesh declares no access-log service "
    "(add `accesslog: {port: 18013}` to the mesh file)"
)


def fetch_status(url: str) -> dict[str, Any] | None:
    """The control plane's ``/status``, or None (said on stderr) when it does not answer."""
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/status", timeout=5) as resp:
            doc: dict[str, Any] = json.loads(resp.read())
        return doc
    except (urllib.error.URLError, OSError, ValueError) as err:
        print(
            f"no Legation control plane at {url} ({err}); is `legation up` running?",
            file=sys.stderr,
        )
        return None


def golden_text(
    golden: dict[str, Any] | None, *, window: int | None = None, limit: int = 50
) -> str:
    """The tables for ``golden`` (``/status``'s part), or why there are none."""
    if not golden:
        return NO_SERVICE + "\n"
    return render(golden, window=window, limit=limit)


def cmd_top(args: argparse.Namespace) -> int:
    live = not args.once and sys.stdout.isatty()
    while True:
        status = fetch_status(args.url)
        if status is None:
            return 1
        try:
            text = golden_text(status.get("golden"), window=args.window, limit=args.limit)
        except ValueError as err:
            print(f"legation top: {err}", file=sys.stderr)
            return 2
        if not live:
            print(text, end="", flush=True)
            return 0
        stamp = time.strftime("%H:%M:%S")
        # home, clear: one frame per refresh, no scrollback growth
        sys.stdout.write(f"\x1b[H\x1b[2J{stamp}  {args.url}  (Ctrl-C to quit)\n\n{text}")
        sys.stdout.flush()
        try:
            time.sleep(args.interval)
        except KeyboardInterrupt:
            return 0


def add_parser(sub: Any, *, default_url: str) -> None:
    top = sub.add_parser(
        "top", help="golden metrics live: per route, service pair and proxy (rps, success, p99)"
    )
    top.add_argument("--url", default=default_url, help="the control plane's status endpoint")
    top.add_argument("--window", type=int, help="seconds (10 or 60; default the shortest)")
    top.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes")
    top.add_argument("--limit", type=int, default=20, help="lines per table")
    top.add_argument("--once", action="store_true", help="print once and exit (no terminal)")
    top.set_defaults(fn=cmd_top)
