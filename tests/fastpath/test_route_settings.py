"""A route's call-out settings (policy, checks, fused route name) travel in the route's metadata,
read by the filter's one ``http_service``: what reaches the server through a real Envoy is
exactly the route's settings, whatever ``x-legation-*`` or forwarding headers the client sends."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httptools
import pytest
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.extensions.filters.http.ext_authz.v3 import ext_authz_pb2
from hypothesis import given
from hypothesis import strategies as st

from legation.envoy_process import EnvoyProcess
from legation.errors import ConfigError
from legation.fastpath import envoy_filter as ef
from tests.config.meshdata import base, parse
from tests.conftest import distinct_ports
from tests.envoy_stack import static_bootstrap
from tests.extauthz.conftest import Client, to_plain
from tests.loop import LoopThread

FORGED = {
    "x-legation-policy": "forged.policy",
    "x-legation-checks": "forged",
    "x-legation-route": "forged-route",
    "x-legation-remote-address": "10.9.9.9",
    "x-forwarded-for": "10.9.9.9",
}


class _Recorder(asyncio.Protocol):
    """Answers every call 200 and records its path and ``x-legation-*`` headers."""

    def __init__(self, seen: list[tuple[str, dict[str, str]]]) -> None:
        self.seen = seen
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.headers: dict[str, str] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_url(self, url: bytes) -> None:
        self.url = url

    def on_header(self, name: bytes, value: bytes) -> None:
        key = name.decode("latin-1").lower()
        if key.startswith("x-legation-"):
            self.headers[key] = value.decode()

    def on_message_complete(self) -> None:
        if self.url.startswith(b"/legation/check/"):  # not the weighted route's upstream call
            self.seen.append((self.url.decode(), self.headers))
        self.headers = {}
        self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")


ROUTES: list[tuple[str, dict[str, Any]]] = [
    ("/policy", {"policy": "a.b", "checks": ("jwt", "rego")}),
    ("/fused", {"route": "fused-r", "policy": "p.q"}),
    ("/weighted", {"policy": "w.x"}),  # a weighted_clusters route, not a direct_response
    ("/plain", {}),
    ("/off", {"disabled": True}),
]
WEIGHTED = {"weighted_clusters": {"clusters": [{"name": "callout", "weight": 1}]}}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("route-settings")
    seen: list[tuple[str, dict[str, str]]] = []
    thread = LoopThread()

    sock = str(tmp / "callout.sock")

    async def listen() -> list[asyncio.Server]:
        loop = asyncio.get_running_loop()
        tcp = await loop.create_server(lambda: _Recorder(seen), "127.0.0.1", 0)
        unix = await loop.create_unix_server(lambda: _Recorder(seen), sock)
        return [tcp, unix]

    servers = thread.run(listen())
    port = servers[0].sockets[0].getsockname()[1]
    ports = distinct_ports("with", "with-admin", "without", "without-admin")
    envoys = []
    try:
        # "with": the call-out on loopback TCP, sending the client's address; "without": on
        # the Unix socket (as extauthz.http_socket), without it
        for name, remote in (("with", True), ("without", False)):
            callout = ef.Callout(cluster="callout", remote_address=remote)
            routes = [
                ef.route_dict(
                    {"match": {"prefix": path}, "route": WEIGHTED}
                    if path == "/weighted"
                    else {"match": {"prefix": path}, "direct_response": {"status": 200}},
                    callout.name,
                    **settings,
                )
                for path, settings in ROUTES
            ]
            cluster = to_plain(
                ef.http_cluster("callout", [sock] if name == "without" else [("127.0.0.1", port)])
            )
            config = static_bootstrap(
                listen_port=ports[name],
                admin_port=ports[f"{name}-admin"],
                routes=routes,
                http_filters=[to_plain(ef.http_filter(callout))],
                clusters=[cluster],
            )
            hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
            hcm["typed_config"]["use_remote_address"] = True  # as Legation's gateway
            envoy = EnvoyProcess(
                config, admin_port=ports[f"{name}-admin"], name=name, log_dir=Path(tmp)
            )
            envoys.append(envoy)
            envoy.start()
            envoy.wait_live()
        yield {"seen": seen, "with": Client(ports["with"]), "without": Client(ports["without"])}
    finally:
        for envoy in envoys:
            envoy.stop()
        for server in servers:
            server.close()
        thread.close()


def call(stack: dict[str, Any], which: str, path: str) -> dict[str, str] | None:
    """What the server received for one request sent with every forged header (None: no call)."""
    before = len(stack["seen"])
    reply = stack[which].get(path, headers=FORGED)
    assert reply.status == 200
    calls = stack["seen"][before:]
    assert len(calls) <= 1
    if not calls:
        return None
    url, headers = calls[0]
    assert url == "/legation/check" + path
    return headers


@pytest.mark.integration
@pytest.mark.parametrize("which", ["with", "without"])
def test_the_server_receives_the_routes_settings_and_nothing_the_client_sent(
    stack: dict[str, Any], which: str
) -> None:
    address = {"x-legation-remote-address": "127.0.0.1"} if which == "with" else {}
    assert call(stack, which, "/policy") == {
        "x-legation-policy": "a.b",
        "x-legation-checks": "jwt,rego",
        **address,
    }
    assert call(stack, which, "/fused") == {
        "x-legation-policy": "p.q",
        "x-legation-route": "fused-r",
        **address,
    }
    assert call(stack, which, "/weighted") == {"x-legation-policy": "w.x", **address}
    # a key the route lacks: no header at all, not the client's
    assert call(stack, which, "/plain") == address
    assert call(stack, which, "/off") is None


def test_route_settings_live_in_the_filters_own_metadata_namespace() -> None:
    out = rc.Route()
    out.metadata.filter_metadata["other"].fields["k"].string_value = "kept"
    callout = ef.Callout(cluster="c", name="legation.fused")
    ef.configure_route(out, callout.name, policy="a.b", route="r")
    assert out.metadata.filter_metadata["other"].fields["k"].string_value == "kept"
    settings = out.metadata.filter_metadata["legation.fused"].fields
    assert {k: v.string_value for k, v in settings.items()} == {"policy": "a.b", "route": "r"}
    setting = ext_authz_pb2.ExtAuthzPerRoute()
    out.typed_per_filter_config["legation.fused"].Unpack(setting)
    assert setting.HasField("check_settings") and not setting.disabled
    service = ef.http_service(callout)
    assert {h.key: h.value for h in service.authorization_request.headers_to_add} == {
        "x-legation-policy": "%METADATA(ROUTE:legation.fused:policy)%",
        "x-legation-checks": "%METADATA(ROUTE:legation.fused:checks)%",
        "x-legation-route": "%METADATA(ROUTE:legation.fused:route)%",
    }


def test_a_disabled_route_names_no_settings_and_keeps_none_from_before() -> None:
    callout = ef.Callout(cluster="c")
    with pytest.raises(ValueError, match="disabled"):
        ef.configure_route(rc.Route(), callout.name, policy="a", disabled=True)
    out = rc.Route()
    ef.configure_route(out, callout.name, policy="a")
    ef.configure_route(out, callout.name, disabled=True)
    setting = ext_authz_pb2.ExtAuthzPerRoute()
    out.typed_per_filter_config[callout.name].Unpack(setting)
    assert setting.disabled and callout.name not in out.metadata.filter_metadata
    earlier = {"metadata": {"filter_metadata": {callout.name: {"policy": "a"}, "x": {"k": "v"}}}}
    kept = ef.route_dict(earlier, callout.name)["metadata"]
    assert kept == {"filter_metadata": {"x": {"k": "v"}}}


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"policy": "a\r\nx-legation-route: open"}, "policy"),
        ({"policy": "a\x00"}, "policy"),
        ({"policy": " a"}, "policy"),
        ({"policy": ""}, "policy"),
        ({"route": "r\x7f"}, "route"),
        ({"checks": ("a,b",)}, "checks"),
        ({"checks": ("",)}, "checks"),
    ],
)
def test_a_setting_that_cannot_be_a_header_value_is_refused(
    kwargs: dict[str, Any], named: str
) -> None:
    with pytest.raises(ValueError, match=f"^{named}:"):
        ef.route_metadata(**kwargs)


@given(st.text(max_size=40))
def test_route_metadata_fuzz_accepts_only_header_safe_values(value: str) -> None:
    try:
        out = ef.route_metadata(policy=value)
    except ValueError as e:
        assert str(e).startswith("policy:")
        return
    kept = out.fields["policy"].string_value
    assert kept == value and kept == kept.strip(" \t")
    assert not any(c < " " or c == "\x7f" for c in kept)


@pytest.mark.parametrize("name", ["a\nb", "a\rb", "a\x00", "a\x7fb"])
def test_a_mesh_policy_name_with_a_control_character_is_a_config_error(name: str) -> None:
    data = base()
    data["routes"] = [{"name": "r", "to": {"service": "reviews"}, "authz": name}]
    with pytest.raises(ConfigError, match="authz"):
        parse(data)
