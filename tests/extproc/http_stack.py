"""The extproc stack's second Envoy: the same chains over Envoy's ext_proc HTTP transport."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from legation.demo import DemoApp
from legation.envoy_process import EnvoyProcess
from legation.extproc.chain import Chain
from legation.fastpath import envoy_filter as fast_filter
from tests.conftest import free_port
from tests.extproc import harness
from tests.extproc.echo import EchoServer

HTTP_ROUTES = {  # path -> (upstream, chain, extra route options); every chain fits HTTP
    "/route/": ("stable", "route", {}),
    "/route-noclear/": ("stable", "route_noclear", {}),
    "/raise/": ("stable", "raise", {}),
    "/raise-open/": ("stable", "raise_open", {}),
    "/slow/": ("stable", "slow", {}),
    "/slow-open/": ("stable", "slow_open", {}),
    "/slow-envoy/": ("stable", "slow_envoy", {}),
    "/slow-envoy-open/": ("stable", "slow_envoy_open", {}),
    "/headers/": ("stable", "headers", {}),  # request and (stateless) response phases
    "/headers-echo/": ("echo", "headers", {}),
    "/answer/": (
        "stable",
        "answer",
        {"add_request_headers": {"x-meta-flag": "%DYNAMIC_METADATA(legation.extproc:flag)%"}},
    ),
}


def http_envoy(
    tmp: Path,
    c: dict[str, Chain],
    unknown: Chain,
    stable: DemoApp,
    canary: DemoApp,
    echo: EchoServer,
    service_port: int,
    message_timeout: float,
) -> tuple[EnvoyProcess, int]:
    """The HTTP transport's Envoy: one ext_proc filter per chain, each route enabling its own."""
    R = harness.route
    chains = dict.fromkeys(n for _, n, _ in HTTP_ROUTES.values())  # one filter per chain
    filters = [(f"legation.ext_proc.http.{n}", "extproc_http", c[n]) for n in chains]
    filters += [
        ("legation.ext_proc.http.nope", "extproc_http", unknown),
        ("legation.ext_proc.http.down", "extproc_http_down", c["route"]),
        (
            "legation.ext_proc.http.down-open",
            "extproc_http_down",
            dataclasses.replace(c["route"], fail_open=True),
        ),
    ]
    routes = [
        R(
            "/route/",
            "canary",
            None,
            headers={"x-legation-cohort": "canary"},
            http_filter="legation.ext_proc.http.route",
        ),
        R(
            "/route-noclear/",
            "canary",
            None,
            headers={"x-legation-cohort": "canary"},
            http_filter="legation.ext_proc.http.route_noclear",
        ),
    ]
    routes += [
        R(path, up, None, http_filter=f"legation.ext_proc.http.{name}", **extra)
        for path, (up, name, extra) in HTTP_ROUTES.items()
    ]
    routes += [
        R("/unknown/", "stable", None, http_filter="legation.ext_proc.http.nope"),
        R("/down/", "stable", None, http_filter="legation.ext_proc.http.down"),
        R("/down-open/", "stable", None, http_filter="legation.ext_proc.http.down-open"),
        R("/native/", "stable", None),
    ]
    clusters = [
        harness.static_cluster("stable", stable.port),
        harness.static_cluster("canary", canary.port),
        harness.static_cluster("echo", echo.port),
        harness.to_dict(fast_filter.http_cluster("extproc_http", [("127.0.0.1", service_port)])),
        harness.to_dict(
            fast_filter.http_cluster("extproc_http_down", [("127.0.0.1", free_port())])
        ),
    ]
    port = free_port()
    boot = harness.http_bootstrap(
        listener_port=port,
        admin_port=free_port(),
        routes=routes,
        clusters=clusters,
        filters=filters,
        message_timeout=message_timeout,
    )
    envoy = EnvoyProcess(
        json.dumps(boot),
        admin_port=boot["admin"]["address"]["socket_address"]["port_value"],
        name="extproc-http-envoy",
        log_dir=tmp,
    )
    envoy.start()
    try:
        envoy.wait_live()
    except BaseException:
        envoy.stop()
        raise
    return envoy, port
