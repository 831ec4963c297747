"""The fault suite as one table: every scenario of ``tests/faults`` run once, side by side.

    .venv/bin/python -m bench.faults [--scale 1] [--only NAME ...]
    .venv/bin/python -m bench.faults --soak [--minutes 30]     # not in CI

Each scenario (:mod:`tests.faults.scenarios`, the same code the tests run) starts its own stack
on free loopback ports (real Envoys, Legation, Redis where needed), puts bounded load through
the gateway, breaks one thing and lets it recover. The table: requests sent, failed (a status the
request should not get; for fail-closed outages the denials by design are in the notes), leaked
(allowed although the policy denies; for the rate limiter: admitted over the limit per second),
hung, recovery time after the fault was removed, and the scenario's own figures. Rows marked
``xfail`` are the scenarios the test suite expects to fail today (see tests/faults/test_faults.py).
``--scale`` stretches the load and the outages (1 here; the tests run 0.6).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path

from tests.faults import scenarios
from tests.faults.load import Report

SCENARIOS: list[tuple[str, Callable[..., Report], dict[str, object], bool]] = [
    ("extauthz", scenarios.extauthz_killed, {}, False),
    ("invalid", scenarios.invalid_configs, {}, False),
    ("reloads", scenarios.valid_reloads, {}, False),
    ("extproc", scenarios.extproc_faults, {}, False),
    ("redis", scenarios.redis_outage, {}, False),
    ("redis-closed", scenarios.redis_outage, {"mode": "closed"}, False),
    ("rotation", scenarios.cert_rotation, {}, False),
    ("control-plane", scenarios.control_plane_killed, {}, False),
    ("control-plane-mtls", scenarios.control_plane_killed, {"mtls": "strict"}, False),
    ("proxies", scenarios.proxies_reloaded, {}, False),
    ("root-ca", scenarios.root_rotation, {}, False),
    ("redis-local", scenarios.redis_outage, {"mode": "local"}, False),
]


def table(rows: list[tuple[str, Report | str, bool]]) -> str:
    head = ["scenario", "sent", "failed", "leaked", "hung", "recovery", "notes"]
    lines = [head]
    for name, result, xfail in rows:
        label = name + (" (xfail)" if xfail else "")
        if isinstance(result, str):
            lines.append([label, "-", "-", "-", "-", "-", result])
            continue
        recovery = "-" if result.recovery_s is None else f"{result.recovery_s:.2f} s"
        notes = ", ".join(f"{k}={v}" for k, v in result.extra.items())
        lines.append(
            [
                f"{result.scenario}" + (" (xfail)" if xfail else ""),
                str(result.sent),
                str(result.failed),
                str(result.leaked),
                str(result.hung),
                recovery,
                notes,
            ]
        )
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(row) + " |" for row in lines[1:]]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--only", nargs="*", choices=[s[0] for s in SCENARIOS])
    parser.add_argument("--soak", action="store_true", help="the long steady-load run only")
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--verbose", action="store_true", help="keep the services' log lines")
    args = parser.parse_args()
    if not args.verbose:  # the faults are on purpose: their tracebacks would bury the table
        logging.getLogger("legation").setLevel(logging.CRITICAL)
    rows: list[tuple[str, Report | str, bool]] = []
    todo: list[tuple[str, Callable[..., Report], dict[str, object], bool]]
    if args.soak:
        todo = [("soak", scenarios.soak, {"minutes": args.minutes}, False)]
    else:
        todo = [s for s in SCENARIOS if not args.only or s[0] in args.only]
    for name, scenario, kwargs, xfail in todo:
        with tempfile.TemporaryDirectory(prefix=f"faults-{name}-") as tmp:
            try:
                if args.soak:
                    result: Report | str = scenario(Path(tmp), **kwargs)
                else:
                    result = scenario(Path(tmp), args.scale, **kwargs)
                print(result.line(), flush=True)  # type: ignore[union-attr]
            except Exception as err:  # a scenario that cannot run is a row, not the end
                first = str(err).splitlines()[0].rsplit(".yaml: ", 1)[-1][:120]
                result = f"did not run: {type(err).__name__}: {first}"
                print(f"FAULTS {name}: {result}", flush=True)
                if not xfail:
                    traceback.print_exc()
        rows.append((name, result, xfail))
    print()
    print(table(rows))


if __name__ == "__main__":
    main()
