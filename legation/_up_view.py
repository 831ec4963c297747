"""What ``legation up`` shows: the try-these banner, and the live status (a table on a terminal,
log lines otherwise) with request counts read from each Envoy's admin endpoint."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from legation.config import Mesh, Route
from legation.envoy_process import EnvoyProcess
from legation.services import route_chains


class StackView:
    """The presentation half of :class:`legation.up.Stack` (a mixin: it reads the stack's state)."""

    out: TextIO
    live: bool
    mesh_path: Path
    log_dir: Path
    envoys: list[EnvoyProcess]
    _banner: list[str]
    _status: dict[str, Any] | None
    _last: dict[str, Any]
    _recent: _Recent | None

    if TYPE_CHECKING:  # implemented by Stack

        def say(self, line: str) -> None: ...

    def banner(self, mesh: Mesh) -> None:
        lines = ["", "Legation is up. Try:"]
        gw = mesh.gateway
        if gw is not None:
            base = f"http://{gw.host}:{gw.port}"
            chains = route_chains(mesh).chains  # the plan's chains, as the service runs them
            for route in mesh.routes:
                if not route.on_gateway:
                    continue
                path = route.match.path.exact or route.match.path.prefix
                chain = chains.get(route.name)
                computed = {
                    h for f in (chain.filters if chain else ()) for h in getattr(f, "computes", ())
                }
                if path is None or any(h.name.lower() in computed for h in route.match.headers):
                    continue  # a header its own filter computes: a client cannot pick it
                headers = " ".join(
                    f"-H '{h.name}: {h.exact}'"
                    for h in route.match.headers
                    if h.exact is not None and not h.invert
                )
                lines.append(
                    f"  curl -s {base}{path} {headers}".rstrip()
                    + f"    # route {route.name}{_asks(route)}"
                )
        lines += [
            "",
            "  legation status            # proxies, ACKed versions, NACKs",
            *(
                ["  legation top               # requests/s, success, p50/p90/p99 live"]
                if mesh.accesslog is not None
                else []
            ),
            *(
                ["  legation traces            # the latest requests' traces, as waterfalls"]
                if mesh.tracing is not None and mesh.tracing.embedded
                else []
            ),
            f"  edit {self.mesh_path} and save: the change is validated and pushed live",
            "  Ctrl-C stops everything",
            "",
        ]
        self._banner = lines
        print("\n".join(lines), file=self.out, flush=True)

    async def _report(self, status: dict[str, Any] | None) -> None:
        if status is None:
            if self.live:
                self._table(self._status or {}, {}, away=True)
            return
        counts = await asyncio.gather(*(asyncio.to_thread(_requests, e) for e in self.envoys))
        by_node = dict(zip((e.name for e in self.envoys), counts, strict=True))
        if self.live:
            self._table(status, by_node)
            return
        for p in status["proxies"]:
            key = p["node_id"]
            now = (p["in_sync"], p["nacks"])
            if self._last.get(key) != now:
                if p["last_nack"] and p["nacks"] != (self._last.get(key) or (0, 0))[1]:
                    n = p["last_nack"]
                    self.say(f"{key} rejected {n['type']} {n['version']}: {n['message']}")
                elif p["in_sync"]:
                    self.say(f"{key} in sync with generation {status['generation']}")
                self._last[key] = now

    def _table(
        self, status: dict[str, Any], counts: dict[str, tuple[int, int]], *, away: bool = False
    ) -> None:
        rows = [
            f"Legation  mesh {status.get('mesh', '?')}  generation "
            f"{status.get('generation', '?')}  xDS {status.get('xds', '?')}"
            + ("  (control plane restarting; the data path keeps serving)" if away else ""),
            "",
        ]
        rows.append(
            f"{'proxy':28} {'admin':16} {'sync':5} {'CDS':13} {'LDS':13} {'nacks':>5} "
            f"{'requests':>9} {'5xx':>6}"
        )
        for p in status.get("proxies", []):
            total, errors = counts.get(p["node_id"], (0, 0))
            rows.append(
                f"{p['node_id']:28} {p['admin']:16} {'yes' if p['in_sync'] else 'NO':5} "
                f"{p['acked'].get('CDS', '-'):13} {p['acked'].get('LDS', '-'):13} "
                f"{p['nacks']:>5} {total:>9} {errors:>6}"
            )
            if p["last_nack"]:
                rows.append(
                    f"    last NACK ({p['last_nack']['type']}): {p['last_nack']['message'][:90]}"
                )
        if status.get("last_error"):
            rows += ["", "last rejected mesh change:", *status["last_error"].splitlines()[:6]]
        if self._recent is not None and self._recent.lines:
            rows += [
                "",
                f"recent (all of it in {self.log_dir / 'legation.log'}):",
                *(f"  {line[:110]}" for line in self._recent.lines),
            ]
        self.out.write("\x1b[H\x1b[J" + "\n".join([*self._banner[1:], *rows]) + "\n")
        self.out.flush()


def _asks(route: Route) -> str:
    """What a route asks of the request-path services, for the banner."""
    parts = []
    if route.authz is not None and route.authz != "disabled":
        parts.append(f"policy {route.authz}")
    if route.filters:
        parts.append("filters " + ", ".join(f.name for f in route.filters))
    if route.rate_limits:
        keys = [
            a.request_headers.header
            for d in route.rate_limits
            for a in d.actions
            if a.request_headers is not None
        ]
        parts.append("rate limited" + (f" per {', '.join(keys)}" if keys else ""))
    return f" ({'; '.join(parts)})" if parts else ""


def _requests(envoy: EnvoyProcess) -> tuple[int, int]:
    """Downstream requests and 5xx answered by the Envoy's HTTP listeners."""
    try:
        stats = envoy.stats(r"^http\..*downstream_rq_(completed|5xx)$")
    except (OSError, ValueError):
        return (0, 0)
    total = sum(
        v
        for k, v in stats.items()
        if k.endswith("downstream_rq_completed") and not k.startswith("http.admin")
    )
    errors = sum(
        v
        for k, v in stats.items()
        if k.endswith("downstream_rq_5xx") and not k.startswith("http.admin")
    )
    return total, errors


class _Recent(logging.Handler):
    """The last few log lines, for the live table."""

    def __init__(self, keep: int = 6) -> None:
        super().__init__(level=logging.INFO)
        self.lines: deque[str] = deque(maxlen=keep)

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(
            f"{time.strftime('%H:%M:%S')} {record.levelname.lower()} "
            f"{record.getMessage().splitlines()[0]}"
        )
