"""``legation traces``: recent traces from the embedded receiver (the control plane's
``/traces``), printed as waterfalls; ``--json`` prints the document as is."""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.parse
import urllib.request

from legation.tracing.waterfall import render


def cmd_traces(args: argparse.Namespace) -> int:
    query = {"limit": str(args.limit)}
    if args.route:
        query["route"] = args.route
    if args.id:
        query["id"] = args.id
    url = args.url.rstrip("/") + "/traces?" + urllib.parse.urlencode(query)
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            document = json.loads(resp.read())
    except urllib.error.HTTPError as err:
        try:
            reason = json.loads(err.read()).get("error", err.reason)
        except ValueError:
            reason = err.reason
        print(f"legation traces: {reason}", file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError) as err:
        print(
            f"no Legation control plane at {args.url} ({err}); is `legation up` running?",
            file=sys.stderr,
        )
        return 1
    if args.json:
        print(json.dumps(document, indent=2))
        return 0
    traces = document["traces"]
    if not traces:
        print("no traces" + (f" on route {args.route}" if args.route else ""))
        return 0 if not args.id else 1
    print("\n\n".join(render(t) for t in traces))
    return 0


def add_parser(sub: argparse._SubParsersAction, default_url: str) -> None:  # type: ignore[type-arg]
    traces = sub.add_parser("traces", help="recent traces from the embedded receiver")
    traces.add_argument("--url", default=default_url, help="the control plane's status endpoint")
    traces.add_argument("--route", help="only traces with a span on this mesh route")
    traces.add_argument("--id", help="one trace, by its id (32 hex digits)")
    traces.add_argument("--limit", type=int, default=5, help="how many of the newest (1-1000)")
    traces.add_argument("--json", action="store_true", help="the spans as JSON")
    traces.set_defaults(fn=cmd_traces)
