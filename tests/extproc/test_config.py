"""Loading the chains YAML: one bad-config fixture per error, the exact message asserted."""

from __future__ import annotations

from pathlib import Path

import pytest

from legation.errors import ConfigError
from legation.extproc.config import build_chains, load_chains

BAD = Path(__file__).parent / "bad_configs"

EXPECTED = {
    "unknown_key.yaml": "{f}: chains.web.filterz: Extra inputs are not permitted",
    "two_sources.yaml": (
        "{f}: chains.web.filters[0].options.rules[0]: a rule needs exactly one of cookie, "
        "header, jwt_claim"
    ),
    "bad_bucket.yaml": (
        "{f}: chains.web.filters[0].options.rules[0].bucket: below (50) is more than buckets (10)"
    ),
    "headers_host.yaml": (
        "{f}: chains.web.filters[0].options.request.set: header 'host' cannot be changed by "
        "this filter"
    ),
    "redact_nothing.yaml": (
        "{f}: chains.web.filters[0].options: needs at least one of fields, paths"
    ),
    "bad_default.yaml": "{f}: default_chain: 'missing' is not a chain (chains: web)",
    "negative_timeout.yaml": "{f}: chains.web.message_timeout: Input should be greater than 0",
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_bad_config_message(name):
    path = BAD / name
    with pytest.raises(ConfigError) as info:
        load_chains(path)
    assert str(info.value) == EXPECTED[name].format(f=path)


def test_unknown_filter_lists_the_available_ones():
    path = BAD / "unknown_filter.yaml"
    with pytest.raises(ConfigError) as info:
        load_chains(path)
    message = str(info.value)
    expected = f"{path}: chains.web.filters[0]: unknown extproc.filter plugin 'nope'"
    assert message.startswith(expected)
    for builtin in ("body_redact", "header_route", "headers", "request_id"):
        assert builtin in message
    assert info.value.code == "unknown_plugin"


def test_not_yaml_names_the_file():
    path = BAD / "not_yaml.yaml"
    with pytest.raises(ConfigError, match=rf"^{path}: invalid YAML"):
        load_chains(path)


def test_missing_file_names_it(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.yaml: cannot read"):
        load_chains(tmp_path / "nope.yaml")


def test_valid_config_builds_chains_in_order():
    chains = build_chains(
        {
            "default_chain": "web",
            "chains": {
                "web": {
                    "fail_open": True,
                    "filters": [
                        {"name": "request_id"},
                        {"name": "headers", "options": {"request": {"set": {"x-a": "1"}}}},
                    ],
                }
            },
        }
    )
    web = chains.get(None)
    assert web is not None and web is chains.get("web")
    assert [f.name for f in web.filters] == ["request_id", "headers"]
    assert web.fail_open is True
    assert chains.get("other") is None


def test_top_level_must_be_a_mapping():
    with pytest.raises(ConfigError, match=r"^x.yaml: expected a mapping with 'chains', got list"):
        build_chains([], source="x.yaml")  # type: ignore[arg-type]
