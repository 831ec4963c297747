"""Every YAML loader refuses alias bombs ("billion laughs"), self-referencing aliases, deep nesting
and oversized files, with a ConfigError naming the file (and the line), before anything walks the
document."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from legation import _yaml
from legation.config import MeshConfigError, load_mesh
from legation.errors import ConfigError
from legation.extauthz.config import load_file as load_authz
from legation.extproc.config import load_chains
from legation.ratelimit.config import load_file as load_ratelimit
from legation.ratelimit.config import load_files as load_ratelimit_files
from legation.services import plan
from tests.conftest import free_port


def billion_laughs(indent: str) -> str:
    """A block list whose 9th item, with its aliases expanded, holds 10^9 strings."""
    lines = [f"{indent}- &l1 [&l0 lol" + ", *l0" * 9 + "]"]
    for i in range(2, 10):
        lines.append(f"{indent}- &l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]")
    return "\n".join(lines) + "\n"


# The bomb where each loader (or what runs after it) walks the value: the mesh's services list,
# a check's or a filter's options (services.py resolves paths in every option), descriptors.
BOMBS = {
    "mesh": "services:\n" + billion_laughs("  "),
    "extauthz": "checks:\n  a:\n    type: rego\n    options:\n      x:\n"
    + billion_laughs("        "),
    "extproc": "chains:\n  c:\n    filters:\n      - name: headers\n        options:\n"
    "          x:\n" + billion_laughs("            "),
    "ratelimit": "domain: d\ndescriptors:\n" + billion_laughs("  "),
}
BOMBS["ratelimit_files"] = BOMBS["ratelimit"]
BOMBS["services_extauthz"] = BOMBS["extauthz"]


def _mesh_with_authz(tmp: Path) -> Path:
    path = tmp / "mesh.yaml"
    path.write_text(
        f"services: [{{name: web, port: 9080, endpoints: [{{port: {free_port()}}}]}}]\n"
        "extauthz: {port: 18010, config: authz.yaml}\n"
        "routes: [{name: web, mesh_hosts: [web], to: {service: web}}]\n"
    )
    return path


def _plan(path: Path) -> Any:
    mesh_path = _mesh_with_authz(path.parent)
    return plan(load_mesh(mesh_path), mesh_path=mesh_path)


LOADERS: dict[str, Callable[[Path], Any]] = {
    "mesh": load_mesh,
    "extauthz": load_authz,
    "extproc": load_chains,
    "ratelimit": load_ratelimit,
    "ratelimit_files": lambda p: load_ratelimit_files([p]),
    "services_extauthz": _plan,
}
FILE_NAME = {"services_extauthz": "authz.yaml"}


def refused(tmp_path: Path, loader: str, text: str | bytes) -> str:
    path = tmp_path / FILE_NAME.get(loader, f"{loader}.yaml")
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    with pytest.raises(ConfigError) as info:
        LOADERS[loader](path)
    message = str(info.value)
    assert str(path) in message, message
    return message


@pytest.mark.parametrize("loader", LOADERS)
def test_billion_laughs_is_refused_naming_the_file_and_line(tmp_path: Path, loader: str) -> None:
    message = refused(tmp_path, loader, BOMBS[loader])
    assert f"expands to more than {_yaml.MAX_NODES} nodes" in message, message
    assert "(at line " in message, message


@pytest.mark.parametrize("loader", LOADERS)
def test_a_self_referencing_alias_is_refused(tmp_path: Path, loader: str) -> None:
    message = refused(tmp_path, loader, "a: &x [1, *x]\n")
    assert "refers to a node that contains it" in message, message


@pytest.mark.parametrize("loader", LOADERS)
def test_deep_nesting_is_refused(tmp_path: Path, loader: str) -> None:
    message = refused(tmp_path, loader, "a: " + "[" * 5000 + "]" * 5000 + "\n")
    assert "levels deep" in message, message


@pytest.mark.parametrize("loader", LOADERS)
def test_an_oversized_file_is_refused_before_parsing(tmp_path: Path, loader: str) -> None:
    message = refused(tmp_path, loader, b"# " + b"x" * _yaml.MAX_BYTES + b"\n")
    assert "larger than" in message, message


def test_the_mesh_error_names_file_field_and_line(tmp_path: Path) -> None:
    path = tmp_path / "mesh.yaml"
    path.write_text(BOMBS["mesh"])
    with pytest.raises(MeshConfigError) as info:
        load_mesh(path)
    assert str(info.value) == (  # &l6 (line 7) is the first anchor over the bound: 10^6 strings
        f"{path}: (top level): the document expands to more than {_yaml.MAX_NODES} nodes "
        "(YAML aliases repeating large anchors?) (at line 7, column 5)"
    )


def test_aliases_within_the_bound_still_work(tmp_path: Path) -> None:
    path = tmp_path / "limits.yaml"
    path.write_text(
        "domain: d\n"
        "descriptors:\n"
        "  - {key: a, rate_limit: &r {unit: second, requests_per_unit: 5}}\n"
        "  - {key: b, rate_limit: *r}\n"
    )
    config = load_ratelimit(path)
    table = config.descriptors.any_value
    assert [table[k].limits[0].requests_per_unit for k in "ab"] == [5, 5]
