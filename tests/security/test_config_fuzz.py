"""Fuzzing the config loaders with hypothesis: arbitrary bytes, arbitrary YAML documents, and valid
configs with one part replaced by an arbitrary value. Every loader either loads the file or raises
a ConfigError whose message names the file; nothing else (no traceback, no hang).

Loaders: the mesh (``load_mesh``, and ``services.plan`` for what it references), the services'
own files (ext_authz, ext_proc chains, envoyproxy/ratelimit YAML). Example counts are bounded so
the file runs in well under 30 s."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from legation.config import load_mesh
from legation.errors import ConfigError
from legation.extauthz.config import load_file as load_authz
from legation.extproc.config import load_chains
from legation.ratelimit.config import load_file as load_ratelimit
from legation.services import plan

QUICKSTART = Path(__file__).parents[2] / "examples" / "quickstart"
FUZZ = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _mesh_and_plan(path: Path) -> Any:
    return plan(load_mesh(path), mesh_path=path)


def _base(name: str) -> Any:
    return yaml.safe_load((QUICKSTART / name).read_text())


def _authz() -> Any:
    """The quickstart's authz.yaml with its policy folder made absolute (it is read elsewhere)."""
    doc = _base("authz.yaml")
    options = doc["checks"]["rego"]["options"]
    options["policy_dir"] = str((QUICKSTART / options["policy_dir"]).resolve())
    return doc


AUTHZ = _authz()


CHAINS = {
    "default_chain": "web",
    "chains": {
        "web": {
            "fail_open": False,
            "message_timeout": 0.5,
            "filters": [
                {"name": "request_id"},
                {"name": "headers", "options": {"request": {"set": {"x-a": "b"}}}},
                {"name": "body_redact", "options": {"fields": ["password"], "paths": ["a.b"]}},
                {
                    "name": "header_route",
                    "options": {
                        "header": "x-cohort",
                        "rules": [{"header": "x-beta", "present": True, "value": "canary"}],
                    },
                },
            ],
        }
    },
}

# loader, the valid document it is fuzzed around, the file name
LOADERS: dict[str, tuple[Callable[[Path], Any], Any, str]] = {
    "mesh": (_mesh_and_plan, _base("mesh.yaml"), "mesh.yaml"),
    "extauthz": (load_authz, AUTHZ, "authz.yaml"),
    "extproc": (load_chains, CHAINS, "chains.yaml"),
    "ratelimit": (load_ratelimit, _base("ratelimit.yaml"), "ratelimit.yaml"),
}

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
    st.sampled_from(
        [
            "",
            "*",
            "..",
            "/",
            "0",
            "-1",
            "1e400",
            "second",
            "minute",
            "rego",
            "jwt",
            "headers",
            "body_redact",
            "ratings",
            "reviews",
            "127.0.0.1",
            "::1",
            "none",
            "fixed_window",
            "token_bucket",
            "closed",
            "open",
            "strict",
            "~",
            "null",
        ]
    ),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(
            st.text(max_size=12)
            | scalars.filter(lambda v: isinstance(v, str | int | bool) or v is None),
            inner,
            max_size=4,
        ),
    ),
    max_leaves=12,
)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def check(loader: str, folder: Path, data: bytes) -> None:
    load, _, name = LOADERS[loader]
    path = folder / name
    if loader == "mesh":  # the files the quickstart mesh references, valid, next to it
        _siblings(folder)
    path.write_bytes(data)
    try:
        load(path)
    except ConfigError as err:
        assert str(path) in str(err), str(err)


def _siblings(folder: Path) -> None:
    (folder / "authz.yaml").write_bytes(dump(AUTHZ))
    (folder / "ratelimit.yaml").write_text((QUICKSTART / "ratelimit.yaml").read_text())


def paths_of(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += paths_of(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += paths_of(v, (*prefix, i))
    return out


def replaced(doc: Any, path: tuple[Any, ...], value: Any, delete: bool) -> Any:
    if not path:
        return value
    doc = copy.deepcopy(doc)
    node = doc
    for part in path[:-1]:
        node = node[part]
    if delete:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return doc


def dump(doc: Any) -> bytes:
    return yaml.safe_dump(doc, allow_unicode=True, sort_keys=False).encode()


@pytest.mark.parametrize("loader", LOADERS)
@FUZZ
@given(data=st.binary(max_size=300))
def test_arbitrary_bytes(folder: Path, loader: str, data: bytes) -> None:
    check(loader, folder, data)


YAMLISH = st.text(
    alphabet=st.sampled_from(list("ab:-[]{}&*!|>'\"#%@`,? \n\t0123456789.~<=")), max_size=120
)


@pytest.mark.parametrize("loader", LOADERS)
@FUZZ
@given(text=YAMLISH)
@example(text="a: 2001-02-30\n")  # PyYAML raises ValueError building this date
@example(text="? [a]\n: b\n")  # an unhashable key
@example(text="a: &x [1, *x]\n")  # a list containing itself
@example(text="a: !!python/object:os.system x\n")
@example(text="a: !!binary ===\n")
@example(text="[" * 400 + "]" * 400)
@example(text="\ufeffa: 1\nb: [1, 2\n")
def test_arbitrary_yaml_syntax(folder: Path, loader: str, text: str) -> None:
    check(loader, folder, text.encode())


@pytest.mark.parametrize("loader", LOADERS)
@FUZZ
@given(doc=values)
def test_arbitrary_documents(folder: Path, loader: str, doc: Any) -> None:
    check(loader, folder, dump(doc))


@pytest.mark.parametrize("loader", LOADERS)
@settings(FUZZ, max_examples=120)
@given(data=st.data())
def test_valid_config_with_one_part_replaced(
    folder: Path, loader: str, data: st.DataObject
) -> None:
    base = LOADERS[loader][1]
    path = data.draw(st.sampled_from(paths_of(base)))
    delete = bool(path) and data.draw(st.booleans())
    doc = replaced(base, path, None if delete else data.draw(values), delete)
    check(loader, folder, dump(doc))


@pytest.mark.parametrize("loader", LOADERS)
def test_the_valid_bases_load(folder: Path, loader: str) -> None:
    load, base, name = LOADERS[loader]
    if loader == "mesh":
        _siblings(folder)
    path = folder / name
    path.write_bytes(dump(base))
    load(path)


# found by this fuzzing: a route filter whose options were omitted was not validated at load
# (pydantic skips validators on defaults); services.plan then raised without the file name
def test_a_route_filter_without_its_required_options_names_the_file(folder: Path) -> None:
    doc = copy.deepcopy(LOADERS["mesh"][1])
    route = next(r for r in doc["routes"] if r.get("filters"))
    del route["filters"][0]["options"]  # header_route: rules are required
    check("mesh", folder, dump(doc))
