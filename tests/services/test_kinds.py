"""The one table of service kinds, and everything that reads it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from legation import cli
from legation.config import load_mesh
from legation.config.checks import semantic_problems
from legation.config.extensions import service_blocks
from legation.services import KINDS, Service
from legation.services.kinds import get, names

ROOT = Path(__file__).resolve().parents[2]


def test_the_kinds_in_filter_order() -> None:
    assert names() == ("extauthz", "extproc", "ratelimit", "accesslog")  # no filter: last
    assert [k.block for k in KINDS] == list(names())


def test_every_kind_implements_the_service_protocol() -> None:
    for kind in KINDS:
        cls = kind.service_class()
        assert cls.kind == kind.name
        for method in (
            "settings",
            "references",
            "start",
            "apply",
            "stop",
            "status",
            "add_cli_options",
            "serve_cli",
        ):
            assert callable(getattr(cls, method)), (kind.name, method)
        assert "registry" in dir(cls)
    assert Service.__doc__


def test_the_list_of_kinds_is_written_once() -> None:
    """No module but the table spells out the kinds as a list."""
    pattern = re.compile(r"""["']extauthz["'],\s*["']extproc["'],\s*["']ratelimit["']""")
    found = [
        p.relative_to(ROOT)
        for p in (ROOT / "legation").rglob("*.py")
        if pattern.search(p.read_text())
    ]
    assert found == [], found
    table = (ROOT / "legation" / "services" / "kinds.py").read_text()
    assert table.count('ServiceKind(name="') == 4


def test_serve_offers_xds_and_each_kind() -> None:
    parser = cli.parser()
    for name in ("xds", *names()):
        args = parser.parse_args(["serve", name])
        assert args.service == name
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "opa"])


def test_serve_options_belong_to_their_kind() -> None:
    parser = cli.parser()
    args = parser.parse_args(["serve", "ratelimit", "--backend", "redis", "--workers", "2"])
    assert (args.backend, args.workers) == ("redis", 2)
    with pytest.raises(SystemExit):  # a rate-limit option means nothing to ext_authz
        parser.parse_args(["serve", "extauthz", "--backend", "redis"])
    args = parser.parse_args(["serve", "extproc", "--stream-idle-timeout", "30"])
    assert args.stream_idle_timeout == 30.0


def test_blocks_and_port_checks_follow_the_table(tmp_path: Path) -> None:
    path = tmp_path / "mesh.yaml"
    path.write_text(
        "services: [{name: web, port: 9080, endpoints: [{port: 9101}]}]\n"
        "extproc: {port: 9101, embedded: false}\n"
        "ratelimit: {port: 18012, embedded: false}\n"
    )
    with pytest.raises(Exception) as info:
        load_mesh(path)
    assert "extproc.port: port 9101 is already used by services[0].endpoints[0].port" in str(
        info.value
    )
    path.write_text(
        "services: [{name: web, port: 9080, endpoints: [{port: 9101}]}]\n"
        "ratelimit: {port: 18012, embedded: false}\nextproc: {port: 18011, embedded: false}\n"
    )
    mesh = load_mesh(path)
    assert [k for k, _ in service_blocks(mesh)] == ["extproc", "ratelimit"]  # table order
    assert semantic_problems(mesh) == []
    assert get("ratelimit").block_of(mesh) is mesh.ratelimit
