"""The access-log service alone, at its limit: ``streams`` gRPC streams (as Envoy opens one per
worker and log name) each sending batches of ``batch`` realistic HTTP entries as fast as the
service takes them, for ``seconds``. The service process's CPU over the window gives its CPU per
entry; entries / wall time its sustained rate (a stream's call returns only once the service has
read every message, so sent = received)."""

from __future__ import annotations

import threading
import time
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc

ROUTES = [f"route-{i}" for i in range(20)]
CLUSTERS = [f"outbound|svc-{i}" for i in range(10)]


def _batch(batch: int, offset: int) -> als_pb2.StreamAccessLogsMessage:
    msg = als_pb2.StreamAccessLogsMessage()
    for i in range(batch):
        e = msg.http_logs.log_entry.add()
        n = offset + i
        e.common_properties.route_name = ROUTES[n % len(ROUTES)]
        e.common_properties.upstream_cluster = CLUSTERS[n % len(CLUSTERS)]
        e.common_properties.duration.FromMilliseconds(1 + n % 300)
        e.response.response_code.value = 503 if n % 50 == 0 else 200
        e.request.path = f"/api/items/{n}"
        e.request.authority = "svc"
        e.request.request_id = f"00000000-0000-0000-0000-{n:012d}"
    return msg


def flood(port: int, *, seconds: float, streams: int = 2, batch: int = 100) -> tuple[int, float]:
    """(entries the service read, wall seconds)."""
    batches = [_batch(batch, k * batch) for k in range(16)]
    sent = [0] * streams
    stop = time.monotonic() + seconds

    def one(index: int) -> None:
        def messages() -> Any:
            first = als_pb2.StreamAccessLogsMessage()
            first.identifier.node.CopyFrom(base_pb2.Node(id=f"flood-{index}", cluster="flood"))
            first.identifier.log_name = "outbound"
            first.http_logs.CopyFrom(batches[0].http_logs)
            yield first
            k = 1
            while time.monotonic() < stop:
                yield batches[k % len(batches)]
                k += 1
            sent[index] = k * batch

        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            als_pb2_grpc.AccessLogServiceStub(channel).StreamAccessLogs(messages(), timeout=60)

    t0 = time.monotonic()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(sent), time.monotonic() - t0


def print_flood(pid: int, port: int, seconds: int) -> None:
    """Flood the service at ``port`` (process ``pid``) and print its rate and CPU per entry."""
    from bench.floor import cpu_seconds

    before = cpu_seconds(pid)
    entries, wall = flood(port, seconds=seconds)
    used = cpu_seconds(pid) - before
    print(
        f"access-log service flooded by 2 streams of 100-entry batches for {wall:.1f} s: "
        f"{entries / wall:,.0f} entries/s sustained, {used / entries * 1e6:.1f} us CPU per entry, "
        f"{used / wall:.0%} of a core"
    )


__all__ = ["accesslog_pb2", "flood", "print_flood"]
