"""The request-path service blocks and what routes ask of them: new fields, exact messages."""

from __future__ import annotations

from typing import Any

import pytest

from legation.config import MeshConfigError
from tests.config.meshdata import base, parse


def mesh_with(**blocks: Any) -> dict[str, Any]:
    data = base()
    data.update(blocks)
    return data


def problems(data: dict[str, Any]) -> list[str]:
    with pytest.raises(MeshConfigError) as info:
        parse(data)
    return str(info.value).splitlines()


def test_embedded_defaults_and_fields() -> None:
    mesh = parse(
        mesh_with(
            extauthz={"port": 18010, "config": "authz.yaml"},
            extproc={"port": 18011},
            ratelimit={
                "port": 18012,
                "config": "rl.yaml",
                "backend": "redis",
                "redis_url": "redis://:secret@127.0.0.1:6379/0",
                "shadow_mode": True,
            },
        )
    )
    assert mesh.extauthz is not None and mesh.extauthz.embedded
    assert mesh.extauthz.failure_mode == "closed" and not mesh.extauthz.fail_open
    assert mesh.extproc is not None and mesh.extproc.failure_mode == "closed"
    assert mesh.ratelimit is not None and mesh.ratelimit.fail_open
    assert mesh.ratelimit.backend == "redis" and mesh.ratelimit.shadow_mode
    assert "secret" not in repr(mesh.ratelimit)


@pytest.mark.parametrize(
    ("blocks", "expected"),
    [
        (
            {"extauthz": {"port": 18010}},
            "mesh.yaml: extauthz.config: an embedded service needs its config file "
            "(or set embedded: false)",
        ),
        (
            {"ratelimit": {"port": 18012}},
            "mesh.yaml: ratelimit.config: an embedded service needs its config file "
            "(or set embedded: false)",
        ),
        (
            {"ratelimit": {"port": 18012, "config": "rl.yaml", "backend": "redis"}},
            "mesh.yaml: ratelimit.redis_url: needed with backend: redis",
        ),
        (
            {"ratelimit": {"port": 18012, "config": "rl.yaml", "redis_url": "redis://x"}},
            "mesh.yaml: ratelimit.redis_url: only used with backend: redis",
        ),
        (
            {"ratelimit": {"port": 18012, "config": "rl.yaml", "backend": "memcached"}},
            "mesh.yaml: ratelimit.backend: expected 'memory' or 'redis', got 'memcached'",
        ),
        (
            {"extproc": {"port": 18011, "embeded": True}},
            "mesh.yaml: extproc.embeded: unknown key (allowed: embedded, failure_mode, host, "
            "http_port, port, protocol, stream_idle_timeout, timeout, tls, workers)",
        ),
    ],
)
def test_block_errors_name_the_field(blocks: dict[str, Any], expected: str) -> None:
    assert problems(mesh_with(**blocks)) == [expected]


def test_not_embedded_needs_no_config() -> None:
    mesh = parse(mesh_with(extauthz={"port": 18010, "embedded": False, "host": "authz.local"}))
    assert mesh.extauthz is not None and mesh.extauthz.config is None


def test_filter_options_are_validated_by_the_plugin_at_load() -> None:
    data = mesh_with(extproc={"port": 18011})
    data["routes"][0]["filters"] = [
        {"name": "headers", "options": {"request": {"set": {"host": "evil"}}, "nope": 1}},
        {"name": "no_such_filter"},
    ]
    lines = problems(data)
    assert lines[0].startswith("mesh.yaml: routes[0].filters[0].options.request.set: ")
    assert "cannot be changed" in lines[0]
    assert lines[1].startswith("mesh.yaml: routes[0].filters[0].options.nope: ")
    assert lines[2].startswith(
        "mesh.yaml: routes[0].filters[1].name: unknown extproc.filter plugin 'no_such_filter' "
        "(available: "
    )
    assert "header_route" in lines[2]


def test_valid_filters_load() -> None:
    data = mesh_with(extproc={"port": 18011})
    data["routes"][0]["filters"] = [{"name": "request_id"}]
    assert parse(data).routes[0].filters[0].name == "request_id"
