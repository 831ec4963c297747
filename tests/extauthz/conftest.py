"""Fixtures for the ext_authz tests: the real service on its own event loop thread, Envoy
bootstraps built with :mod:`legation.extauthz.envoy_filter`, a plain HTTP client, RSA keys."""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt as pyjwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from google.protobuf.json_format import MessageToDict
from prometheus_client import CollectorRegistry

from legation.demo import DemoApp
from legation.envoy_process import EnvoyProcess
from legation.extauthz import envoy_filter
from legation.extauthz.service import Settings, start_server, stop_server
from tests import loop
from tests.conftest import free_port
from tests.envoy_stack import static_bootstrap, static_cluster

REPO = Path(__file__).resolve().parents[2]


def to_plain(message: Any) -> dict[str, Any]:
    """A protobuf as plain JSON-able dicts (yaml.safe_dump refuses OrderedDict)."""
    return json.loads(json.dumps(MessageToDict(message)))


class ServiceThread(loop.ServiceThread):
    """The ext_authz service on a private event loop, so tests can block on HTTP calls."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(lambda: start_server(settings), stop=lambda s: stop_server(s, 0))
        self.settings = settings


@dataclass
class Route:
    prefix: str
    policy: str | None = None
    checks: Sequence[str] = ()
    disabled: bool = False


def bootstrap(
    *,
    listen_port: int,
    admin_port: int,
    authz_port: int,
    upstream_port: int,
    routes: Sequence[Route],
    max_request_bytes: int = 1024,
    status_on_error: int = 403,
) -> dict[str, Any]:
    """A static Envoy bootstrap: one listener, ext_authz then router, per-route authz config."""
    vroutes = []
    for r in routes:
        per_route = envoy_filter.per_route_any(
            policy=r.policy, checks=tuple(r.checks), disabled=r.disabled
        )
        vroutes.append(
            {
                "match": {"prefix": r.prefix},
                "route": {"cluster": "upstream"},
                "typed_per_filter_config": {envoy_filter.FILTER_NAME: to_plain(per_route)},
            }
        )
    authz = envoy_filter.http_filter(
        "extauthz", max_request_bytes=max_request_bytes, status_on_error=status_on_error
    )
    return static_bootstrap(
        listen_port=listen_port,
        admin_port=admin_port,
        routes=vroutes,
        http_filters=[to_plain(authz)],
        clusters=[
            static_cluster("upstream", upstream_port),
            to_plain(envoy_filter.grpc_cluster("extauthz", [("127.0.0.1", authz_port)])),
        ],
    )


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class Client:
    def __init__(self, port: int) -> None:
        self.port = port

    def request(
        self,
        method: str,
        path: str,
        *,
        headers: Mapping[str, str] | None = None,
        body: bytes | None = None,
    ) -> Reply:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request(method, path, body=body, headers=dict(headers or {}))
            resp = conn.getresponse()
            return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
        finally:
            conn.close()

    def get(self, path: str, **kw: Any) -> Reply:
        return self.request("GET", path, **kw)


@dataclass
class Stack:
    service: ServiceThread | None
    envoy: EnvoyProcess
    client: Client
    upstream: Any
    registry: CollectorRegistry


StackFactory = Callable[..., Stack]


class StackPool:
    """Starts service + Envoy + demo upstream stacks and stops all of them on close()."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.services: list[ServiceThread] = []
        self.envoys: list[EnvoyProcess] = []
        self.upstreams: list[DemoApp] = []

    def make(
        self,
        *,
        config: dict[str, Any] | None,
        routes: Sequence[Route],
        authz_port: int | None = None,
        **bootstrap_kw: Any,
    ) -> Stack:
        upstream = DemoApp(name="upstream").start_in_thread()
        self.upstreams.append(upstream)
        registry = CollectorRegistry()
        service = None
        if config is not None:
            service = ServiceThread(Settings(port=0, config=config, registry=registry)).start()
            self.services.append(service)
            authz_port = service.port
        assert authz_port is not None
        listen, admin = free_port(), free_port()
        cfg = bootstrap(
            listen_port=listen,
            admin_port=admin,
            authz_port=authz_port,
            upstream_port=upstream.port,
            routes=routes,
            **bootstrap_kw,
        )
        envoy = EnvoyProcess(
            cfg,
            admin_port=admin,
            name="envoy-extauthz",
            log_dir=self.tmp / f"envoy{len(self.envoys)}",
        )
        self.envoys.append(envoy)
        envoy.start()
        envoy.wait_live()
        return Stack(service, envoy, Client(listen), upstream, registry)

    def close(self) -> None:
        for e in self.envoys:
            e.stop()
        for s in self.services:
            s.stop()
        for app in self.upstreams:
            stop_demo(app)


@pytest.fixture
def stack_factory(tmp_path: Path) -> Iterator[StackFactory]:
    """``stack_factory(config=..., routes=[...])``: service + Envoy + demo upstream."""
    pool = StackPool(tmp_path)
    yield pool.make
    pool.close()


def stop_demo(app: DemoApp) -> None:
    """DemoApp.stop_thread leaves its loop open (a ResourceWarning, an error here): close it."""
    app.stop_thread()
    if app._loop is not None and not app._loop.is_running():
        app._loop.close()


class JwksServer:
    """A loopback HTTP server serving a JWKS document that tests can rotate; counts fetches."""

    def __init__(self) -> None:
        self.document: dict[str, Any] = {"keys": []}
        self.fetches = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.fetches += 1
                data = json.dumps(outer.document).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                return None

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/jwks.json"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(5)


class Signer:
    """An RSA key pair (generated per test session) with its public JWK."""

    def __init__(self, kid: str) -> None:
        self.kid = kid
        self.private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        jwk = json.loads(pyjwt.algorithms.RSAAlgorithm.to_jwk(self.private.public_key()))
        self.jwk = {**jwk, "kid": kid, "use": "sig", "alg": "RS256"}

    def public_pem(self) -> bytes:
        return self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def token(self, claims: dict[str, Any], *, kid: str | None = None, **kw: Any) -> str:
        headers = {"kid": kid if kid is not None else self.kid}
        return pyjwt.encode(claims, self.private, algorithm="RS256", headers=headers, **kw)


def read_log(
    path: Path, until: Callable[[list[dict[str, Any]]], bool], timeout: float = 5.0
) -> list[dict[str, Any]]:
    """The decision log's entries once ``until`` holds for them: the service flushes the log in
    the background (~0.2 s behind), so tests wait for the entries they need, bounded in time."""
    deadline = time.monotonic() + timeout
    while True:
        text = path.read_text() if path.exists() else ""
        entries = [json.loads(line) for line in text.splitlines() if line.strip()]
        if until(entries) or time.monotonic() > deadline:
            return entries
        time.sleep(0.05)
