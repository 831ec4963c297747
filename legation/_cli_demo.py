"""``legation demo``: one demo app (what ``legation up`` starts for the quickstart, and the
compose stack runs in a container per app)."""

from __future__ import annotations

import argparse
import asyncio

from legation._cli_serve import _wait_for_signal


def cmd_demo(args: argparse.Namespace) -> int:
    from legation.demo import DemoApp

    async def run() -> None:
        app = await DemoApp(
            name=args.name,
            version=args.version,
            host=args.host,
            port=args.port,
            fail_every=args.fail_every,
            delay_ms=args.delay_ms,
            plain=dict(_name_port(v) for v in args.call_plain) or None,
            outbound=_outbound(args.outbound) if args.outbound else None,
        ).start()
        print(f"demo app {args.name} {args.version} on {args.host}:{app.port}", flush=True)
        try:
            await _wait_for_signal()
        finally:
            await app.stop()

    asyncio.run(run())
    return 0


def _outbound(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit():
        raise SystemExit(f"--outbound expects HOST:PORT, got {value!r}")
    return host, int(port)


def _name_port(value: str) -> tuple[str, int]:
    name, _, port = value.partition("=")
    if not name or not port.isdigit():
        raise SystemExit(f"--call-plain expects NAME=PORT, got {value!r}")
    return name, int(port)


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    demo = sub.add_parser("demo", help="run one demo app (what `up` starts for the quickstart)")
    demo.add_argument("--name", required=True)
    demo.add_argument("--version", default="v1")
    demo.add_argument("--host", default="127.0.0.1")
    demo.add_argument("--port", type=int, required=True)
    demo.add_argument("--fail-every", type=int, default=0, help="answer 503 to every Nth request")
    demo.add_argument("--delay-ms", type=int, default=0)
    demo.add_argument(
        "--call-plain",
        action="append",
        default=[],
        metavar="NAME=PORT",
        help="?call=NAME goes to http://NAME:PORT/ (a captured pod) instead of a sidecar port",
    )
    demo.add_argument(
        "--outbound",
        metavar="HOST:PORT",
        help="its sidecar's outbound listener: ?call=NAME goes there with Host: NAME",
    )
    demo.set_defaults(fn=cmd_demo)
