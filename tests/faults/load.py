"""A bounded load loop on loopback, and what it measured.

:class:`Load` runs the loop in a child process (``python -m tests.faults.load``), so that the
control plane and services a scenario hosts in the test process do not share its GIL with the
load. The child keeps ``workers`` HTTP/1.1 keep-alive connections to one port; each worker sends
the scenario's :class:`Probe`s in turn, paced to ``rate`` requests a second in all, until the
wall-clock bound, the request bound, or the parent says stop. Every request is recorded as
(start, end, probe, status), wall-clock seconds, status 0 for a transport error and -1 for a
request that outlived the client's own timeout (a hang).

:class:`Report` turns the samples into the suite's figures: sent, failed (a status the probe does
not expect), leaked (a 2xx/3xx on a probe the policy denies), hung (longer than the hang bound),
and the recovery time after the fault was removed (end of the last failure after that mark).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Probe:
    """One kind of request: ``ok`` the statuses that are right for it; ``denied`` when the policy
    refuses it, so any 2xx/3xx answer is a leak."""

    name: str
    path: str
    headers: dict[str, str] = field(default_factory=dict)
    ok: tuple[int, ...] = (200,)
    denied: bool = False


@dataclass(frozen=True)
class Sample:
    start: float
    end: float
    probe: int
    status: int


@dataclass
class Report:
    """The figures of one scenario run (``extra``: scenario-specific counts, printed too)."""

    scenario: str
    sent: int
    failed: int
    leaked: int
    hung: int
    recovery_s: float | None
    statuses: dict[str, dict[int, int]]
    extra: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        recovery = "-" if self.recovery_s is None else f"{self.recovery_s:.2f}s"
        extra = " ".join(f"{k}={v}" for k, v in self.extra.items())
        return (
            f"FAULTS {self.scenario}: sent={self.sent} failed={self.failed} "
            f"leaked={self.leaked} hung={self.hung} recovery={recovery} {extra}"
        ).rstrip()


def classify(probe: Probe, status: int) -> str:
    """``ok``, ``leaked`` or ``failed``."""
    if probe.denied and 200 <= status < 400:
        return "leaked"
    return "ok" if status in probe.ok else "failed"


def report(
    scenario: str,
    probes: list[Probe],
    samples: list[Sample],
    *,
    restored_at: float | None = None,
    hang_bound: float = 2.0,
    ignore: tuple[float, float] | None = None,
    extra: dict[str, Any] | None = None,
) -> Report:
    """Figures for ``samples``. ``restored_at``: when the fault was removed (recovery is measured
    from it). ``ignore``: a window (start, end) in which failures are what the failure mode
    promises (e.g. fail closed while a service is away); they are counted in ``extra`` as
    ``failed_by_design``, not as failed (a request in flight at either edge included). Leaks
    count everywhere."""
    failed = leaked = hung = by_design = 0
    last_failure_end: float | None = None
    statuses: dict[str, Counter[int]] = {p.name: Counter() for p in probes}
    for s in samples:
        probe = probes[s.probe]
        statuses[probe.name][s.status] += 1
        if s.status == -1 or s.end - s.start > hang_bound:
            hung += 1
        verdict = classify(probe, s.status)
        if verdict == "leaked":
            leaked += 1
        elif verdict == "failed":
            if ignore is not None and s.end >= ignore[0] and s.start <= ignore[1]:
                by_design += 1
            else:
                failed += 1
            if restored_at is not None and s.end >= restored_at:
                last_failure_end = max(last_failure_end or 0.0, s.end)
    recovery = None
    if restored_at is not None:
        recovery = 0.0 if last_failure_end is None else last_failure_end - restored_at
    more = dict(extra or {})
    if ignore is not None:
        more = {"failed_by_design": by_design, **more}
    return Report(
        scenario,
        len(samples),
        failed,
        leaked,
        hung,
        recovery,
        {k: dict(v) for k, v in statuses.items()},
        more,
    )


def recovered(probes: list[Probe], samples: list[Sample], since: float, *, tail: int = 20) -> bool:
    """True when, after ``since``, the last ``tail`` answers of every probe sent then are right
    (the service came back within the run's bound)."""
    by_probe: dict[int, list[Sample]] = {}
    for s in samples:
        if s.start >= since:
            by_probe.setdefault(s.probe, []).append(s)
    if not by_probe:
        return False
    return all(
        len(got) >= min(tail, 3) and all(classify(probes[i], s.status) == "ok" for s in got[-tail:])
        for i, got in by_probe.items()
    )


class Load:
    """The load loop as a child process; ``start()``, do the fault, ``finish()`` the samples."""

    def __init__(
        self,
        port: int,
        probes: list[Probe],
        *,
        workers: int = 8,
        rate: float = 400,
        duration: float = 6.0,
        max_requests: int = 50_000,
        timeout: float = 5.0,
    ) -> None:
        self.probes = probes
        self.spec = {
            "port": port,
            "probes": [asdict(p) for p in probes],
            "workers": workers,
            "rate": rate,
            "duration": duration,
            "max_requests": max_requests,
            "timeout": timeout,
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0

    def start(self) -> Load:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.faults.load", json.dumps(self.spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert self.proc.stdout is not None
        ready = self.proc.stdout.readline()  # the child says when its connections are open
        if not ready.startswith(b"ready"):
            raise RuntimeError(f"load generator did not start: {ready!r}")
        self.started_at = time.time()
        return self

    def finish(self, *, early: bool = False) -> list[Sample]:
        """Wait for the wall-clock bound (or stop now with ``early``) and return the samples."""
        assert self.proc is not None and self.proc.stdin is not None
        bound = float(self.spec["duration"]) + float(self.spec["timeout"]) + 30  # type: ignore[arg-type]
        out, _ = self.proc.communicate(b"stop\n" if early else b"", timeout=bound)
        return [Sample(*row) for row in json.loads(out)]

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


# -- the child -----------------------------------------------------------------------------


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip().lower()
    if headers.get("transfer-encoding") == "chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    else:
        await reader.readexactly(int(headers.get("content-length", "0")))
    return status, headers.get("connection") == "close"


async def _run(spec: dict[str, Any]) -> list[tuple[float, float, int, int]]:
    probes = [Probe(**{**p, "ok": tuple(p["ok"])}) for p in spec["probes"]]
    requests = [
        (
            f"GET {p.path} HTTP/1.1\r\nhost: faults\r\n"
            + "".join(f"{k}: {v}\r\n" for k, v in p.headers.items())
            + "\r\n"
        ).encode()
        for p in probes
    ]
    samples: list[tuple[float, float, int, int]] = []
    stop = asyncio.Event()
    deadline = time.time() + spec["duration"]
    interval = spec["workers"] / spec["rate"]
    port, timeout = spec["port"], spec["timeout"]

    async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        try:
            return await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
        except (OSError, TimeoutError):
            return None

    async def worker(
        i: int, conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None
    ) -> None:
        n = i
        next_at = time.time() + interval * i / spec["workers"]
        while not stop.is_set() and time.time() < deadline and len(samples) < spec["max_requests"]:
            await asyncio.sleep(max(0.0, next_at - time.time()))
            next_at = max(next_at + interval, time.time() - interval)
            which = n % len(probes)
            n += 1
            start = time.time()
            if conn is None:
                conn = await connect()
                if conn is None:
                    samples.append((start, time.time(), which, 0))
                    continue
            reader, writer = conn
            close = True
            try:
                writer.write(requests[which])
                status, close = await asyncio.wait_for(_read_response(reader), timeout)
            except TimeoutError:
                status = -1
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
                status = 0
            samples.append((start, time.time(), which, status))
            if close:
                writer.close()
                conn = None
        if conn is not None:
            conn[1].close()

    async def watch_parent() -> None:
        line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        if line.strip() == "stop":  # end of input alone means: run to the bound
            stop.set()

    conns = [await connect() for _ in range(spec["workers"])]
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    watcher = asyncio.ensure_future(watch_parent())
    await asyncio.gather(*(worker(i, c) for i, c in enumerate(conns)))
    watcher.cancel()
    return samples


def main() -> None:
    samples = asyncio.run(_run(json.loads(sys.argv[1])))
    sys.stdout.write(json.dumps(samples))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
