"""Fixtures: one real Envoy in front of one ext_proc service, shared by the integration tests."""

from __future__ import annotations

import base64
import dataclasses
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from legation import plugins
from legation.demo import DemoApp
from legation.envoy_process import EnvoyProcess
from legation.extproc.chain import Chain
from legation.extproc.config import Chains, load_chains
from legation.extproc.filters.headers import HeadersFactory
from legation.extproc.http_server import HttpSettings, serve_http
from legation.extproc.service import Settings, servicer_of
from tests.conftest import free_port
from tests.extproc import harness
from tests.extproc.echo import EchoServer
from tests.extproc.filters_for_tests import FACTORIES
from tests.extproc.http_stack import http_envoy as _http_envoy

ENVOY_MESSAGE_TIMEOUT = 1.0
SERVICE_MESSAGE_TIMEOUT = 0.3

CHAINS_YAML = """
chains:
  route:
    filters:
      - name: header_route
        options:
          header: x-legation-cohort
          default: stable
          rules:
            - {cookie: canary, equals: "yes", value: canary}
            - {header: x-beta, present: true, value: canary}
            - {jwt_claim: group, one_of: [beta, staff], value: canary}
            - {header: x-user-id, bucket: {buckets: 100, below: 30, seed: s1}, value: canary}
  route_noclear:
    filters:
      - name: header_route
        options:
          header: x-legation-cohort
          clear_route_cache: false
          rules: [{header: x-beta, present: true, value: canary}]
  headers:
    filters:
      - name: headers
        options:
          request:
            set: {x-env: test}
            add: {x-via: legation}
            remove: [x-debug]
            rename: {x-old-name: x-new-name}
          response:
            set: {cache-control: no-store}
            remove: [x-demo-version]
  reqid:
    filters:
      - name: request_id
  redact:
    filters:
      - name: body_redact
        options: {fields: [authorization, x-secret], paths: [headers.x-path-secret]}
  streamed:
    filters: [{name: t_upper}]
  buffered:
    filters: [{name: t_wrap}]
  raise:
    filters: [{name: t_raise}]
  raise_open:
    fail_open: true
    filters: [{name: t_raise}]
  slow:
    filters: [{name: t_slow}]
  block:
    filters: [{name: t_block}]
  block_open:
    fail_open: true
    filters: [{name: t_block}]
  slow_open:
    fail_open: true
    filters: [{name: t_slow}]
  slow_envoy:
    message_timeout: 20
    filters: [{name: t_slow}]
  slow_envoy_open:
    fail_open: true
    message_timeout: 20
    filters: [{name: t_slow}]
  answer:
    filters: [{name: t_answer}]
"""


def jwt(claims: dict[str, object]) -> str:
    """An unsigned-looking JWT (header_route reads claims, it does not verify)."""

    def enc(d: dict[str, object]) -> str:
        return base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()

    return f"{enc({'alg': 'none'})}.{enc(claims)}.sig"


@pytest.fixture(scope="session", autouse=True)
def test_filters() -> Iterator[None]:
    for factory in FACTORIES:
        plugins.register("extproc.filter", factory)
    yield
    for factory in FACTORIES:
        plugins.unregister("extproc.filter", factory.name)


@dataclass
class Stack:
    envoy: EnvoyProcess
    service: harness.ServiceThread
    registry: CollectorRegistry
    chains: Chains
    stable: DemoApp
    canary: DemoApp
    port: int
    transport: str = "grpc"
    http: Stack | None = None
    """The same chains called over Envoy's ext_proc HTTP transport (another Envoy, the same
    service: its HTTP listener shares the gRPC servicer's processor)."""

    @property
    def failed_calls(self) -> str:
        """Envoy's stat counting calls to the service that failed, on this transport."""
        name = "streams_failed" if self.transport == "grpc" else "http_not_ok_resp_received"
        return f"http.ingress.ext_proc.{name}"

    def get(self, path: str, **kwargs: object) -> harness.Response:
        return harness.request(self.port, path, **kwargs)  # type: ignore[arg-type]

    def metric(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0


@pytest.fixture(scope="package")
def stack(tmp_path_factory: pytest.TempPathFactory, test_filters: None) -> Iterator[Stack]:
    tmp: Path = tmp_path_factory.mktemp("extproc")
    config = tmp / "chains.yaml"
    config.write_text(CHAINS_YAML)
    chains = load_chains(config)
    stable = DemoApp(name="stable").start_in_thread()
    canary = DemoApp(name="canary", version="v2").start_in_thread()
    echo = EchoServer().start()
    registry = CollectorRegistry()
    service = harness.ServiceThread(
        Settings(config_file=config, registry=registry, message_timeout=SERVICE_MESSAGE_TIMEOUT)
    ).start()
    c = chains.chains
    hf = HeadersFactory()
    unknown = Chain(name="nope", filters=[hf.create(hf.validate({"request": {"set": {"a": "b"}}}))])
    R = harness.route
    routes = [
        R("/route/", "canary", c["route"], headers={"x-legation-cohort": "canary"}),
        R("/route/", "stable", c["route"]),
        R("/route-noclear/", "canary", c["route_noclear"], headers={"x-legation-cohort": "canary"}),
        R("/route-noclear/", "stable", c["route_noclear"]),
        R("/headers/", "stable", c["headers"]),
        R("/headers-echo/", "echo", c["headers"]),
        R(
            "/reqid/",
            "stable",
            c["reqid"],
            add_request_headers={"x-meta-rid": "%DYNAMIC_METADATA(legation.extproc:request_id)%"},
        ),
        R("/redact/", "stable", c["redact"]),
        R("/redact-echo/", "echo", c["redact"]),
        R("/streamed/", "echo", c["streamed"]),
        R("/buffered/", "echo", c["buffered"]),
        R("/raise/", "stable", c["raise"]),
        R("/raise-open/", "stable", c["raise_open"]),
        R("/slow/", "stable", c["slow"]),
        R("/block/", "stable", c["block"]),
        R("/block-open/", "echo", c["block_open"]),
        R("/slow-open/", "stable", c["slow_open"]),
        R("/slow-envoy/", "stable", c["slow_envoy"]),
        R("/slow-envoy-open/", "stable", c["slow_envoy_open"]),
        R("/down/", "stable", c["route"], service_cluster="extproc_down"),
        R("/down-open/", "stable", c["route"], service_cluster="extproc_down", fail_open=True),
        R(
            "/answer/",
            "stable",
            c["answer"],
            add_request_headers={"x-meta-flag": "%DYNAMIC_METADATA(legation.extproc:flag)%"},
        ),
        R("/native/", "stable", None),
        R("/unknown/", "stable", unknown),
    ]
    clusters = [
        harness.static_cluster("stable", stable.port),
        harness.static_cluster("canary", canary.port),
        harness.static_cluster("echo", echo.port),
        harness.to_dict(
            __import__("legation.extproc.envoy_filter", fromlist=["x"]).grpc_cluster(
                "extproc_down", "127.0.0.1", free_port()
            )
        ),
    ]
    port = free_port()
    boot = harness.bootstrap(
        listener_port=port,
        admin_port=free_port(),
        service_port=service.port,
        routes=routes,
        clusters=clusters,
        message_timeout=ENVOY_MESSAGE_TIMEOUT,
    )
    envoy = EnvoyProcess(
        json.dumps(boot),
        admin_port=boot["admin"]["address"]["socket_address"]["port_value"],
        name="extproc-envoy",
        log_dir=tmp,
    )
    envoy.start()
    http_envoy: EnvoyProcess | None = None
    listening = None
    try:
        envoy.wait_live()
        processor = servicer_of(service.server).processor
        listening = service.call(serve_http(processor, HttpSettings()))
        http_envoy, http_port = _http_envoy(
            tmp, c, unknown, stable, canary, echo, listening.port, ENVOY_MESSAGE_TIMEOUT
        )
        grpc_stack = Stack(envoy, service, registry, chains, stable, canary, port)
        grpc_stack.http = dataclasses.replace(
            grpc_stack, envoy=http_envoy, port=http_port, transport="http"
        )
        yield grpc_stack
    finally:
        if http_envoy is not None:
            http_envoy.stop()
        envoy.stop()
        if listening is not None:
            service.call(listening.close())
        service.stop()
        for app in (stable, canary):
            app.stop_thread()
            if app._loop is not None:  # DemoApp.stop_thread leaves its loop open
                app._loop.close()
        echo.stop()


@pytest.fixture(params=["grpc", "http"])
def any_stack(request: pytest.FixtureRequest, stack: Stack) -> Stack:
    """The stack over each ext_proc transport in turn: the same decision table through both."""
    if request.param == "grpc":
        return stack
    assert stack.http is not None
    return stack.http
