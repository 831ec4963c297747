"""Fixtures for the golden-metrics tests: Legation's access-log service on a loop thread, and a
real Envoy (the shared static bootstrap) logging to it through ``observe.envoy_config``."""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.json_format import MessageToDict

from legation.envoy_process import EnvoyProcess
from legation.observe.aggregator import Aggregator
from legation.observe.als import AccessLogServicer, start_als_server
from legation.observe.envoy_config import access_log, als_cluster
from tests.conftest import distinct_ports
from tests.envoy_stack import static_bootstrap
from tests.loop import LoopThread

NODE_ID = "sidecar~productpage-1"
NODE_CLUSTER = "productpage"


def plain(message: Any) -> dict[str, Any]:
    """A protobuf as plain JSON-able dicts (yaml.safe_dump refuses OrderedDict)."""
    return dict(json.loads(json.dumps(MessageToDict(message, preserving_proto_field_name=True))))


class RecordingServicer(AccessLogServicer):
    """Legation's servicer, also keeping every raw message (to search them for secrets)."""

    def __init__(self, aggregator: Aggregator) -> None:
        super().__init__(aggregator)
        self.raw: list[bytes] = []

    async def StreamAccessLogs(self, request_iterator: Any, context: Any) -> Any:
        async def tee() -> Any:
            async for message in request_iterator:
                self.raw.append(message.SerializeToString())
                yield message

        return await super().StreamAccessLogs(tee(), context)


class AlsWorld:
    """The access-log service, and an Envoy whose one listener logs every request to it."""

    def __init__(
        self,
        tmp: Path,
        *,
        routes: Sequence[dict[str, Any]],
        http_filters: Sequence[dict[str, Any]],
        clusters: Sequence[dict[str, Any]],
        request_headers: Sequence[str] = (),
    ) -> None:
        self.aggregator = Aggregator()
        self.servicer = RecordingServicer(self.aggregator)
        self.loop = LoopThread()
        self.server: grpc.aio.Server | None = None
        self.server, als_port = self.loop.run(start_als_server(self.servicer))
        ports = distinct_ports("listen", "admin")
        self.port = ports["listen"]
        config = static_bootstrap(
            listen_port=ports["listen"],
            admin_port=ports["admin"],
            routes=list(routes),
            http_filters=list(http_filters),
            clusters=[*clusters, plain(als_cluster("127.0.0.1", als_port))],
        )
        config["node"] = {"id": NODE_ID, "cluster": NODE_CLUSTER}
        hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
        hcm["typed_config"]["access_log"] = [
            plain(access_log("outbound", flush_interval_ms=100, request_headers=request_headers))
        ]
        self.envoy = EnvoyProcess(
            config, admin_port=ports["admin"], name="observe", log_dir=tmp
        ).start()
        self.envoy.wait_live()

    def get(self, path: str, headers: Mapping[str, str] | None = None) -> int:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request("GET", path, headers=dict(headers or {}))
            resp = conn.getresponse()
            resp.read()
            return resp.status
        finally:
            conn.close()

    def many(self, paths: Sequence[str]) -> list[int]:
        """Each path on one keep-alive connection."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        out = []
        try:
            for p in paths:
                conn.request("GET", p)
                resp = conn.getresponse()
                resp.read()
                out.append(resp.status)
        finally:
            conn.close()
        return out

    def wait_entries(self, n: int, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while self.servicer.entries < n:
            assert time.monotonic() < deadline, (self.servicer.entries, n)
            time.sleep(0.05)

    def close(self) -> None:
        self.envoy.stop()
        if self.server is not None:
            self.loop.run(self.server.stop(0))
        self.loop.close()


@pytest.fixture
def als_world(tmp_path: Path) -> Iterator[Callable[..., AlsWorld]]:
    worlds: list[AlsWorld] = []

    def make(**kwargs: Any) -> AlsWorld:
        world = AlsWorld(tmp_path, **kwargs)
        worlds.append(world)
        return world

    yield make
    for w in worlds:
        w.close()
