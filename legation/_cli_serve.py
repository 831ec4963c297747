"""``legation serve``: one service (or the control plane) alone, as a foreground process."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from pathlib import Path

from legation import _loop
from legation.errors import LegationError
from legation.services.kinds import WORKER_PORT_STEP


def loop_refused(command: str) -> bool:
    """Whether ``LEGATION_EVENT_LOOP`` is refused (then said on stderr, prefixed ``command``):
    checked before a command starts anything (legation._loop)."""
    try:
        _loop.choice()
    except LegationError as err:
        print(f"{command}: {err}", file=sys.stderr)
        return True
    return False


def cmd_serve(args: argparse.Namespace) -> int:
    if loop_refused(f"legation serve {args.service}"):  # every `legation serve` runs on uvloop
        return 2
    if args.service == "xds":
        return _loop.run(_serve_xds(args))
    if args.plan:
        return _loop.run(_serve_plan(args))
    workers = max(1, args.workers)
    from legation.services import kinds

    if workers > 1 and getattr(kinds.get(args.service).service_class(), "one_process", False):
        print(
            f"legation serve {args.service}: one process only (it aggregates in memory); "
            "drop --workers",
            file=sys.stderr,
        )
        return 2
    if workers == 1:
        return _loop.run(_serve_one(args, reuse_port=False, index=0))
    if args.service == "ratelimit" and args.backend == "memory":
        print(
            "legation serve ratelimit --workers: the memory backend counts in one process "
            "(each worker would count alone); use --backend redis",
            file=sys.stderr,
        )
        return 2
    return _serve_workers(args, workers)


def _serve_workers(args: argparse.Namespace, workers: int) -> int:
    """``--workers N``: N forked workers (worker i on port + 100 i; all on one port with
    ``--reuse-port``); with ``--metrics-port``, this parent
    serves their metrics merged (:mod:`legation._worker_metrics`) once all are forked."""
    import tempfile

    from legation._worker_metrics import serve_merged
    from legation.services.workers import run_workers

    host = (args.listen or "127.0.0.1:0").rpartition(":")[0] or "127.0.0.1"
    with tempfile.TemporaryDirectory(prefix="legation-workers-") as tmp:
        directory = Path(tmp)
        servers = []

        def forked() -> None:
            if not args.metrics_port:
                return
            try:
                servers.append(serve_merged(args.metrics_port, host, directory, workers))
            except OSError as err:  # the workers serve on; only the merged metrics are missing
                print(f"cannot serve metrics on {host}:{args.metrics_port}: {err}", file=sys.stderr)

        try:
            return run_workers(
                workers,
                lambda index: _loop.run(
                    _serve_one(args, reuse_port=args.reuse_port, index=index, metrics_dir=directory)
                ),
                after_fork=forked,
            )
        finally:
            for server in servers:
                server.shutdown()


async def _wait_for_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def _serve_xds(args: argparse.Namespace) -> int:
    from legation.controlplane import ControlPlane

    if not args.config:
        print("legation serve xds needs --config MESH.yaml", file=sys.stderr)
        return 2
    host, _, port = (args.listen or "").rpartition(":")
    cp = ControlPlane(
        args.config,
        xds_host=host or None,
        xds_port=int(port) if port else None,
        status_host=args.status_host,
        status_port=args.status_port,
        services_dir=Path(args.services_dir) if args.services_dir else None,
        processes_file=Path(args.processes_file) if args.processes_file else None,
        capture=args.capture,
    )
    try:
        await cp.start()
    except LegationError as err:
        print(err, file=sys.stderr)
        return 2
    print(
        f"xDS on {cp.server.address if cp.server else '?'} ({_loop.running()}); status on "
        f"http://{args.status_host}:{cp.status_port}/status",
        flush=True,
    )
    try:
        await _wait_for_signal()
    finally:
        await cp.stop()
    return 0


async def _serve_plan(args: argparse.Namespace) -> int:
    """``legation serve <kind> --plan FILE``: the service the control plane published, kept
    following the file (:mod:`legation.services.follower`)."""
    from legation.services.follower import Follower

    follower = Follower(Path(args.plan), kind=args.service, worker=args.worker)
    try:
        bound = await follower.start()
    except LegationError as err:
        print(err, file=sys.stderr)
        return 2
    metrics = follower.serve_metrics(args.metrics_port)
    print(
        f"{args.service} worker {args.worker} (pid {os.getpid()}, {_loop.running()}) on port "
        f"{bound}, metrics on "
        f"127.0.0.1:{metrics}, "
        f"following {args.plan}",
        flush=True,
    )
    watching = asyncio.create_task(follower.follow())
    signalled = asyncio.create_task(_wait_for_signal())
    try:
        await asyncio.wait({watching, signalled}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watching.cancel()
        signalled.cancel()
        await follower.stop(1.0)
    return 0 if signalled.done() and not signalled.cancelled() else 1


async def _serve_one(
    args: argparse.Namespace, *, reuse_port: bool, index: int, metrics_dir: Path | None = None
) -> int:
    from legation.services import kinds

    host, _, port = (args.listen or "127.0.0.1:0").rpartition(":")
    host = host or "127.0.0.1"
    service = kinds.get(args.service).service_class()
    base = int(port)
    if base and index and not reuse_port:  # worker i on port + 100 i, as the mesh's workers
        base += WORKER_PORT_STEP * index
    try:
        _, bound, stop = await service.serve_cli(args, host=host, port=base, reuse_port=reuse_port)
    except LegationError as err:
        print(err, file=sys.stderr)
        return 2
    if args.metrics_port:
        from prometheus_client import start_http_server

        if metrics_dir is None:
            start_http_server(args.metrics_port, addr=host)
        else:  # a worker: on loopback for the parent, which serves --metrics-port merged
            from legation._worker_metrics import port_file

            server, _ = start_http_server(0, addr="127.0.0.1")
            port_file(metrics_dir, index).write_text(str(server.server_port))
    # one write per line: the workers share stdout, and print's two writes may interleave
    sys.stdout.write(f"{args.service} (pid {os.getpid()}, {_loop.running()}) on {host}:{bound}\n")
    sys.stdout.flush()
    try:
        await _wait_for_signal()
    finally:
        await stop(1.0)
    return 0
