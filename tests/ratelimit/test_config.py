"""Config loading: every bad input has a fixture and an exact message naming file and field."""

from __future__ import annotations

from pathlib import Path

import pytest

from legation.errors import ConfigError
from legation.ratelimit.config import Algorithm, load_file, load_files, parse
from tests.ratelimit.conftest import FIXTURES

BAD = FIXTURES / "bad"

CASES = {
    "unknown_limit_key": (
        "descriptors[0].rate_limit: unknown key 'requests_per_second'",
        "unknown_key",
    ),
    "unknown_descriptor_key": ("descriptors[0]: unknown key 'ratelimit'", "unknown_key"),
    "unknown_top_key": ("unknown key 'version'", "unknown_key"),
    "missing_domain": ("domain: the domain is required and must not be empty", "missing_domain"),
    "missing_key": ("descriptors[0].key: descriptor has no key", "missing_key"),
    "invalid_unit": (
        "descriptors[0].rate_limit.unit: invalid rate limit unit 'sec' (one of "
        "second, minute, hour, day, week, month, year)",
        "invalid_unit",
    ),
    "rpu_not_int": (
        "descriptors[0].rate_limit.requests_per_unit: expected int, got 'many'",
        "invalid_type",
    ),
    "unlimited_with_unit": (
        "descriptors[0].rate_limit.unit: an unlimited rate limit must not set a unit",
        "unlimited_with_unit",
    ),
    "duplicate_descriptor": (
        "descriptors[2]: duplicate descriptor composite key 'd.a_b'",
        "duplicate_descriptor",
    ),
    "invalid_algorithm": (
        "descriptors[0].descriptors[0].rate_limit.algorithm: unknown algorithm "
        "'leaky_bucket' (one of fixed_window, sliding_window, token_bucket)",
        "invalid_algorithm",
    ),
    "duplicate_limit": (
        "descriptors[0]: two limits with the same unit and algorithm (they would "
        "share one counter)",
        "duplicate_limit",
    ),
    "replaces_unknown_key": (
        "descriptors[0].rate_limit.replaces[0]: unknown key 'nme'",
        "unknown_key",
    ),
    "shadow_not_bool": ("descriptors[0].shadow_mode: expected bool, got 'yes'", "invalid_type"),
    "empty": ("empty file", "missing_domain"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_config_names_file_and_field(name: str) -> None:
    path = BAD / f"{name}.yaml"
    message, code = CASES[name]
    with pytest.raises(ConfigError) as info:
        load_file(path)
    assert str(info.value) == f"{path}: {message}"
    assert info.value.code == code


def test_every_bad_fixture_has_a_case() -> None:
    assert {p.stem for p in BAD.glob("*.yaml")} - {"invalid_yaml"} == set(CASES)


def test_invalid_yaml_names_the_file() -> None:
    path = BAD / "invalid_yaml.yaml"
    with pytest.raises(ConfigError) as info:
        load_file(path)
    assert str(info.value).startswith(f"{path}: invalid YAML")
    assert info.value.code == "invalid_yaml"


def test_missing_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.yaml: cannot read"):
        load_file(tmp_path / "nope.yaml")


def test_duplicate_domain_across_files_names_both(tmp_path: Path) -> None:
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("domain: same\n")
    b.write_text("domain: same\n")
    with pytest.raises(ConfigError) as info:
        load_files([a, b])
    assert str(info.value) == (
        f"{b}: domain: duplicate domain 'same' (already loaded from {a}; "
        "set merge_domains to merge them)"
    )


def test_every_readme_example_loads() -> None:
    for path in sorted((FIXTURES / "readme").glob("*.yaml")):
        assert load_file(path).domain


def test_extensions_several_limits_and_algorithms() -> None:
    config = parse("""
domain: api
descriptors:
  - key: user
    rate_limit: {unit: second, requests_per_unit: 10, algorithm: token_bucket}
    rate_limits:
      - {unit: hour, requests_per_unit: 1000, algorithm: sliding_window, name: hourly}
      - {unit: hour, requests_per_unit: 5000}
""")
    node = config.descriptors.any_value["user"]
    assert [(lim.unit, lim.requests_per_unit, lim.algorithm) for lim in node.limits] == [
        ("second", 10, Algorithm.TOKEN_BUCKET),
        ("hour", 1000, Algorithm.SLIDING_WINDOW),
        ("hour", 5000, Algorithm.FIXED_WINDOW),
    ]
    assert node.limits[1].name == "hourly"


def test_units_are_case_insensitive_and_numeric_values_are_strings() -> None:
    config = parse(
        "domain: d\ndescriptors:\n  - key: port\n    value: 8080\n"
        "    rate_limit: {unit: SECOND, requests_per_unit: 1}\n"
    )
    node = config.descriptors.exact[("port", "8080")]
    assert node.limits[0].unit == "second"
