"""``legation status``: the running stack's proxies, processes, rotation and golden metrics,
from the control plane's ``/status`` (``--json`` prints it as is)."""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request


def cmd_status(args: argparse.Namespace) -> int:
    try:
        with urllib.request.urlopen(args.url.rstrip("/") + "/status", timeout=5) as resp:
            status = json.loads(resp.read())
    except (urllib.error.URLError, OSError) as err:
        print(
            f"no Legation control plane at {args.url} ({err}); is `legation up` running?",
            file=sys.stderr,
        )
        return 1
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    print(f"mesh {status['mesh']}  generation {status['generation']}  xDS {status['xds']}")
    if status.get("last_error"):
        print("last rejected change:\n  " + status["last_error"].replace("\n", "\n  "))
    processes = [
        f"{p.get('name') or p['role']} {p['pid']}"
        + (f" ({p['restarts']} restarts)" if p.get("restarts") else "")
        for p in status.get("processes", [])
    ]
    if processes:
        print("processes  " + ", ".join(processes))
    tracing = status.get("tracing")
    if tracing:
        store = tracing.get("store")
        kept = f", {store['traces']} traces / {store['spans']} spans kept" if store else ""
        mtls = " over mTLS" if tracing.get("tls") == "mesh" else ""
        refused = f", {tracing['refused']} exports refused" if tracing.get("refused") else ""
        print(
            f"tracing  {tracing['collector']} at {tracing['address']}{mtls}, "
            f"sampling {tracing['sampling']:g} %{kept}{refused}"
        )
    rotation = ((status.get("mtls") or {}).get("ca") or {}).get("rotation")
    if rotation:
        print(
            f"root rotation  phase {rotation['phase']} since {rotation['phase_since']}: "
            f"{rotation['old_fingerprint']} -> {rotation['new_fingerprint']}"
        )
    for p in status["proxies"]:
        state = "in sync" if p["in_sync"] else ("connected" if p["connected"] else "DISCONNECTED")
        listeners = ", ".join(f"{k} {v}" for k, v in p["listeners"].items())
        print(f"\n{p['node_id']}  ({p['kind']}, {state})")
        print(f"  admin      {p['admin']}")
        print(f"  listeners  {listeners}")
        acked = "  ".join(f"{t} {v}" for t, v in sorted(p["acked"].items()))
        print(f"  acked      {acked or '-'}")
        nack = p.get("last_nack")
        last = f"{nack['type']} {nack['version']}: {nack['message']}" if nack else "-"
        print(f"  last NACK  {last}")
    if status.get("golden"):
        from legation._cli_top import golden_text

        print("\ngolden metrics (`legation top` for a live view)")
        longest = max(status["golden"]["windows"])  # a status is a summary: the longest window
        print(golden_text(status["golden"], window=longest, limit=10), end="")
    return 0
