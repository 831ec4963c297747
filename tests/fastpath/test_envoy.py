"""The same decisions through a real Envoy, gRPC call-out beside HTTP call-out: what the client
and the upstream see is the same; a dead server or a failing check denies (fail closed)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from legation.demo import DemoApp
from legation.envoy_process import EnvoyProcess
from legation.fastpath import envoy_filter as ef
from legation.fastpath.server import CalloutServer, Settings, start_server
from tests.conftest import distinct_ports
from tests.extauthz.conftest import Client, Reply, Route, ServiceThread, bootstrap, to_plain
from tests.fastpath.cases import (
    ALLOWED_HEADERS,
    CLIENT_HEADERS,
    UPSTREAM_HEADERS,
    service_config,
)
from tests.fastpath.conftest import policy_dir

pytestmark = [pytest.mark.integration]

ROUTES = [
    Route("/boom", checks=("table",)),
    Route("/slow", checks=("table",)),
    Route("/", policy="fast.test", checks=("rego",)),
]
CALLOUT = dict(
    allowed_headers=ALLOWED_HEADERS,
    upstream_headers=UPSTREAM_HEADERS,
    client_headers=CLIENT_HEADERS,
    status_on_error=503,
)  # = the service's error_status (see below)


class FastPathThread:
    def __init__(self, settings: Settings) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server: CalloutServer = self.call(start_server(settings))

    def call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(20)

    def stop(self) -> None:
        self.call(self.server.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


def http_bootstrap(listen: int, admin: int, authz: int, upstream: int) -> dict[str, Any]:
    callout = ef.Callout(cluster="fastpath", **CALLOUT)  # type: ignore[arg-type]
    base = bootstrap(
        listen_port=listen, admin_port=admin, authz_port=authz, upstream_port=upstream, routes=[]
    )
    hcm = base["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["http_filters"][0] = to_plain(ef.http_filter(callout))
    hcm["route_config"]["virtual_hosts"][0]["routes"] = [
        ef.route_dict(
            {"match": {"prefix": r.prefix}, "route": {"cluster": "upstream"}},
            callout.name,
            policy=r.policy,
            checks=tuple(r.checks),
        )
        for r in ROUTES
    ]
    base["static_resources"]["clusters"][1] = to_plain(
        ef.http_cluster("fastpath", [("127.0.0.1", authz)])
    )
    return base


@pytest.fixture(scope="module")
def stacks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Client]]:
    from legation import plugins
    from legation.extauthz.service import Settings as GrpcSettings
    from tests.fastpath.cases import TableFactory

    tmp = tmp_path_factory.mktemp("fastpath-envoy")
    plugins.register("extauthz.check", TableFactory())
    config = service_config(policy_dir(tmp))
    upstream = DemoApp(name="upstream").start_in_thread()
    grpc = ServiceThread(GrpcSettings(config=config, registry=CollectorRegistry())).start()
    fast = FastPathThread(
        Settings(
            config=config,
            registry=CollectorRegistry(),
            upstream_headers=UPSTREAM_HEADERS,
            client_headers=CLIENT_HEADERS,
        )
    )
    ports = distinct_ports("g", "ga", "h", "ha", "d", "da", "dead")
    envoys = [
        EnvoyProcess(
            bootstrap(
                listen_port=ports["g"],
                admin_port=ports["ga"],
                authz_port=grpc.port,
                upstream_port=upstream.port,
                routes=ROUTES,
                status_on_error=503,
            ),
            admin_port=ports["ga"],
            name="grpc",
            log_dir=tmp / "grpc",
        ),
        EnvoyProcess(
            http_bootstrap(ports["h"], ports["ha"], fast.server.port, upstream.port),
            admin_port=ports["ha"],
            name="http",
            log_dir=tmp / "http",
        ),
        EnvoyProcess(
            http_bootstrap(ports["d"], ports["da"], ports["dead"], upstream.port),
            admin_port=ports["da"],
            name="dead",
            log_dir=tmp / "dead",
        ),
    ]
    try:
        for e in envoys:
            e.start()
        for e in envoys:
            e.wait_live()
        yield {"grpc": Client(ports["g"]), "http": Client(ports["h"]), "dead": Client(ports["d"])}
    finally:
        for e in envoys:
            e.stop()
        fast.stop()
        grpc.stop()
        plugins.unregister("extauthz.check", "table")


def seen(reply: Reply) -> dict[str, Any]:
    """What matters of an answer: status, body (or the upstream's view of the headers)."""
    out: dict[str, Any] = {"status": reply.status}
    if reply.status == 200 and reply.headers.get("x-demo-service") == "upstream":
        headers = reply.json()["headers"]
        out["upstream"] = {
            k: v
            for k, v in headers.items()
            if k in ("x-user", "x-legation-user", "x-drop", "x-tenant")
        }
        out["x-cache"] = reply.headers.get("x-cache")
    else:
        out["body"] = reply.body
        out["content-type"] = reply.headers.get("content-type")
    return out


def set_cookies(client: Client, path: str) -> list[str]:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", client.port, timeout=10)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read()
        return sorted(v for k, v in resp.getheaders() if k.lower() == "set-cookie")
    finally:
        conn.close()


CASES = [
    ("/allow", {"x-tenant": "t1", "x-user": "forged"}),
    ("/teapot", {}),
    ("/remove", {"x-drop": "1"}),
    ("/multi", {}),
    ("/cache", {}),
    ("/auth", {"authorization": "Bearer ok"}),
    ("/auth", {"authorization": "Bearer no"}),
    ("/query?x=1", {}),
    ("/limited", {}),
    ("/boom", {}),
    ("/slow", {}),
]


@pytest.mark.parametrize(("path", "headers"), CASES, ids=[f"{p} {h}" for p, h in CASES])
def test_envoy_applies_both_alike(
    stacks: dict[str, Client], path: str, headers: dict[str, str]
) -> None:
    grpc = seen(stacks["grpc"].get(path, headers=headers))
    http = seen(stacks["http"].get(path, headers=headers))
    if grpc["status"] >= 500:
        # Envoy reads any 5xx call-out answer as a failed call: status_on_error, no body
        assert http == {"status": grpc["status"], "body": b"", "content-type": None}
    else:
        assert http == grpc


def test_the_envoy_cases_say_what_they_should(stacks: dict[str, Client]) -> None:
    http = stacks["http"]
    allow = seen(http.get("/allow", headers={"x-tenant": "t1", "x-user": "forged"}))
    assert allow["upstream"] == {"x-user": "t1", "x-tenant": "t1"}
    removed = seen(http.get("/remove", headers={"x-drop": "1"}))
    assert removed["upstream"] == {"x-legation-user": "bob"}
    assert seen(http.get("/multi"))["upstream"] == {"x-user": "a,b"}
    assert seen(http.get("/cache"))["x-cache"] == "hit"
    teapot = seen(http.get("/teapot"))
    assert (teapot["status"], teapot["body"]) == (409, b"no tea")
    assert set_cookies(http, "/teapot") == set_cookies(stacks["grpc"], "/teapot") == ["a=1", "b=2"]
    assert seen(http.get("/boom"))["status"] == 503  # error_status: fail closed
    assert seen(http.get("/slow"))["status"] == 503  # check timeout: fail closed


def test_server_down_envoy_denies(stacks: dict[str, Client]) -> None:
    assert stacks["dead"].get("/allow", headers={"x-tenant": "t1"}).status == 503


def test_a_client_cannot_pick_its_policy_or_checks(stacks: dict[str, Client]) -> None:
    # the table check would allow /teapot; the route's override sets the headers itself
    reply = stacks["http"].get(
        "/teapot", headers={"x-legation-checks": "table", "x-legation-policy": "fast.dry"}
    )
    assert reply.status == 409
