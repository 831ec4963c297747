"""envoyproxy/ratelimit's own config cases, run against Legation's loader and matcher.

Every YAML below is one of upstream's ``test/config/*.yaml`` fixtures, retyped and trimmed to what
its test looks at (comments dropped, flow style where shorter); the file names are upstream's, so
a rejection message can be compared to the one ``test/config/config_test.go`` expects. Legation's
messages are its own (file, then field path, then what is wrong); the table says which upstream
message each one stands for. Lookup rows mirror the ``GetLimit`` calls of ``config_test.go``
(``TestBasicConfig``, ``TestDomainMerge``, ``TestShadowModeConfig``, ``TestWildcardConfig``,
``TestDetailedMetric``, ``TestValueToMetric_*``, ``TestShareThreshold``,
``TestWildcardStatsBehavior``, ``TestMetadata``): the limit found (or none) and the stats key.

Rows marked ``DIFFERS`` are deliberate differences, listed in README.md ("Compatibility with
envoyproxy/ratelimit").
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from legation.errors import ConfigError
from legation.ratelimit.config import Match, RateLimitConfig, load_files

# -- upstream fixtures (test/config/*.yaml), retyped ----------------------------------------------

FIXTURES: dict[str, str] = {
    "bad_limit_unit.yaml": """
domain: test-domain
descriptors:
  - {key: key1, value: value1, rate_limit: {unit: foo, requests_per_unit: 5}}
""",
    "bad_yaml.yaml": "'''\n",
    "basic_config.yaml": """
domain: test-domain
descriptors:
  - key: key1
    value: value1
    descriptors:
      - {key: subkey1, rate_limit: {unit: second, requests_per_unit: 5}}
      - {key: subkey1, value: subvalue1, rate_limit: {unit: second, requests_per_unit: 10}}
  - {key: key2, rate_limit: {unit: minute, requests_per_unit: 20}}
  - {key: key2, value: value2, rate_limit: {unit: minute, requests_per_unit: 30}}
  - {key: key2, value: value3}
  - {key: key3, rate_limit: {unit: hour, requests_per_unit: 1}}
  - {key: key4, rate_limit: {name: key4_rate_limit, unit: day, requests_per_unit: 1}}
  - key: key5
    value: value5
    rate_limit: {unit: day, requests_per_unit: 15}
    descriptors:
      - {key: subkey5, value: subvalue5, rate_limit: {unit: day, requests_per_unit: 25}}
  - {key: key6, rate_limit: {unlimited: true}}
  - {key: key7, detailed_metric: true, rate_limit: {unit: minute, requests_per_unit: 70}}
""",
    "duplicate_domain.yaml": "domain: test-domain\ndescriptors:\n",
    "duplicate_key.yaml": """
domain: test-domain
descriptors:
  - {key: key1, value: value1}
  - {key: key1, value: value1}
""",
    "empty_domain.yaml": "descriptors:\n",
    "empty_key.yaml": "domain: test-domain\ndescriptors:\n  - value: value1\n",
    "merge_domain_key1.yaml": """
domain: test-domain
descriptors:
  - {key: key1, value: value1, rate_limit: {unit: minute, requests_per_unit: 10}}
""",
    "merge_domain_key2.yaml": """
domain: test-domain
descriptors:
  - {key: key2, value: value2, rate_limit: {unit: minute, requests_per_unit: 20}}
""",
    "metadata.yaml": """
domain: test-domain
descriptors:
  - key: key1
    value: value1
    descriptors:
      - key: subkey1
        rate_limit: {unit: second, requests_per_unit: 5}
        metadata: {name: service_1}
      - {key: subkey1, value: subvalue1, rate_limit: {unit: second, requests_per_unit: 10}}
  - key: key2
    rate_limit: {unit: minute, requests_per_unit: 20}
    metadata: {service_with_quota: {name: service_2}}
""",
    "misspelled_key.yaml": """
domain: test-domain
descriptors:
  - {key: key1, value: value1, ratelimit: {unit: day, requests_per_unit: 5}}
""",
    "misspelled_key2.yaml": """
domain: test-domain
descriptors:
  - {key: key1, value: value1, rate_limit: {unit: day, requestsperunit: 5}}
""",
    "non_map_list.yaml": "domain: test-domain\ndescriptors: [a, b, c]\n",
    "non_string_key.yaml": """
0.25: test-domain
descriptors:
  - {key: key1, value: value1, rate_limit: {unit: day, requests_per_unit: 5}}
""",
    "replaces_empty.yaml": """
domain: test-domain
descriptors:
  - key: key1
    value: value1
    descriptors:
      - key: subkey1
        rate_limit:
          name: self
          replaces: [{name: }]
          unit: second
          requests_per_unit: 5
""",
    "replaces_self.yaml": """
domain: test-domain
descriptors:
  - key: key1
    value: value1
    descriptors:
      - key: subkey1
        rate_limit: {name: self, replaces: [{name: self}], unit: second, requests_per_unit: 5}
""",
    "shadowmode_config.yaml": """
domain: test-domain
descriptors:
  - key: key1
    value: value1
    descriptors:
      - {key: subkey1, rate_limit: {unit: second, requests_per_unit: 5}}
      - key: subkey1
        value: subvalue1
        rate_limit: {unit: second, requests_per_unit: 10}
        shadow_mode: true
  - {key: key2, rate_limit: {unit: minute, requests_per_unit: 20}, shadow_mode: true}
  - {key: key2, value: value2, rate_limit: {unit: minute, requests_per_unit: 30}}
""",
    "share_threshold.yaml": """
domain: test-domain
descriptors:
  - {key: files, value: files/*, share_threshold: true,
     rate_limit: {unit: minute, requests_per_unit: 100}}
  - key: nested
    value: parent
    descriptors:
      - {key: files, value: nested/*, share_threshold: true,
         rate_limit: {unit: minute, requests_per_unit: 200}}
  - key: files
    value: top/*
    share_threshold: true
    descriptors:
      - {key: files, value: nested/*, share_threshold: true,
         rate_limit: {unit: minute, requests_per_unit: 300}}
  - key: route
    value: api/*
    share_threshold: true
    value_to_metric: true
    descriptors:
      - {key: method, rate_limit: {unit: minute, requests_per_unit: 60}}
  - key: service
    value: svc/*
    share_threshold: true
    descriptors:
      - {key: endpoint, detailed_metric: true, rate_limit: {unit: minute, requests_per_unit: 80}}
  - key: path
    value: path/*
    share_threshold: true
    descriptors:
      - key: file
        value: file/*
        share_threshold: false
        descriptors:
          - {key: type, rate_limit: {unit: minute, requests_per_unit: 120}}
  - key: user
    value: user/*
    share_threshold: true
    descriptors:
      - key: resource
        value: res/*
        share_threshold: true
        descriptors:
          - {key: action, rate_limit: {unit: minute, requests_per_unit: 150}}
  - {key: file, value: test1, rate_limit: {unit: minute, requests_per_unit: 50}}
  - {key: file, value: test*, share_threshold: true,
     rate_limit: {unit: minute, requests_per_unit: 100}}
  - {key: midpath, value: /api*v1, share_threshold: true,
     rate_limit: {unit: minute, requests_per_unit: 100}}
  - {key: multiroute, value: svc*ep*rpc, share_threshold: true,
     rate_limit: {unit: minute, requests_per_unit: 50}}
  - {key: midroute, value: /api*v2, share_threshold: true, value_to_metric: true,
     rate_limit: {unit: minute, requests_per_unit: 80}}
  - key: tenant
    value: t*prod
    share_threshold: true
    descriptors:
      - {key: resource, value: res*v2, share_threshold: true,
         rate_limit: {unit: minute, requests_per_unit: 60}}
""",
    "unlimited_with_unit.yaml": """
domain: test-domain
descriptors:
  - {key: foo, rate_limit: {unlimited: true, unit: day, requests_per_unit: 25}}
""",
    "wildcard.yaml": """
domain: test-domain
descriptors:
  - {key: wild, value: foo*, rate_limit: {unit: minute, requests_per_unit: 20}}
  - {key: noWild, value: foo, rate_limit: {unit: minute, requests_per_unit: 20}}
  - {key: noVal, rate_limit: {unit: minute, requests_per_unit: 20}}
  - {key: midWild, value: bar*b, rate_limit: {unit: minute, requests_per_unit: 20}}
  - {key: multiWild, value: foo*bar*baz, rate_limit: {unit: minute, requests_per_unit: 10}}
  - key: nestedWild
    value: val1
    descriptors:
      - {key: wild, value: goo*, rate_limit: {unit: minute, requests_per_unit: 20}}
""",
}

# Inline configs of config_test.go (Go structs there), as YAML.
INLINE: dict[str, str] = {
    # TestDetailedMetric cases 1-4
    "detailed_top.yaml": """
domain: nested
descriptors:
  - key: key-1
    detailed_metric: true
    rate_limit: {unit: minute, requests_per_unit: 100}
    descriptors: [{key: key-2, rate_limit: {unit: minute, requests_per_unit: 5}}]
""",
    "detailed_none.yaml": """
domain: nested
descriptors:
  - key: key-1
    rate_limit: {unit: minute, requests_per_unit: 100}
    descriptors: [{key: key-2, rate_limit: {unit: minute, requests_per_unit: 5}}]
""",
    "detailed_both.yaml": """
domain: nested
descriptors:
  - key: key-1
    detailed_metric: true
    rate_limit: {unit: minute, requests_per_unit: 100}
    descriptors:
      - {key: key-2, detailed_metric: true, rate_limit: {unit: minute, requests_per_unit: 5}}
""",
    # TestDetailedMetric "realistic" config
    "detailed_realistic.yaml": """
domain: nested
descriptors:
  - {key: key_1, detailed_metric: true, rate_limit: {unit: minute, requests_per_unit: 500}}
  - {key: key_1, value: some-value-for-key-1, rate_limit: {unit: minute, requests_per_unit: 500}}
  - key: key_2
    detailed_metric: true
    rate_limit: {unit: minute, requests_per_unit: 5000}
    descriptors:
      - {key: key_3, detailed_metric: true}
      - {key: key_3, value: requested-key3-value, detailed_metric: true,
         rate_limit: {unit: minute, requests_per_unit: 5}}
""",
    # TestValueToMetric_UsesRuntimeValuesInStats / _WithEmptyValue / _FullKeyMatchesStatsKey
    "v2m_runtime.yaml": """
domain: domain
descriptors:
  - key: route
    value_to_metric: true
    descriptors:
      - key: http_method
        value_to_metric: true
        descriptors: [{key: subject_id, rate_limit: {unit: minute, requests_per_unit: 60}}]
""",
    # TestValueToMetric_DefaultKeyIncludesValueAtThatLevel
    "v2m_default.yaml": """
domain: d
descriptors:
  - key: k1
    value_to_metric: true
    descriptors: [{key: k2, rate_limit: {unit: second, requests_per_unit: 1}}]
""",
    # TestValueToMetric_MidLevelOnly
    "v2m_mid.yaml": """
domain: d
descriptors:
  - key: k1
    descriptors:
      - key: k2
        value_to_metric: true
        descriptors: [{key: k3, rate_limit: {unit: second, requests_per_unit: 1}}]
""",
    # TestValueToMetric_NoFlag_Unchanged
    "v2m_none.yaml": """
domain: d
descriptors:
  - {key: k1, descriptors: [{key: k2, rate_limit: {unit: second, requests_per_unit: 1}}]}
""",
    # TestValueToMetric_DoesNotOverrideDetailedMetric
    "v2m_detailed.yaml": """
domain: domain
descriptors:
  - key: route
    value_to_metric: true
    descriptors:
      - key: http_method
        value_to_metric: true
        descriptors:
          - {key: subject_id, detailed_metric: true,
             rate_limit: {unit: minute, requests_per_unit: 60}}
""",
    # TestValueToMetric_WithConfiguredValues
    "v2m_configured.yaml": """
domain: test-domain
descriptors:
  - key: route
    value_to_metric: true
    descriptors:
      - key: http_method
        value: GET
        value_to_metric: true
        descriptors: [{key: subject_id, rate_limit: {unit: minute, requests_per_unit: 60}}]
      - key: http_method
        value: POST
        value_to_metric: true
        descriptors: [{key: subject_id, rate_limit: {unit: minute, requests_per_unit: 30}}]
""",
    # TestValueToMetric_WithWildcard
    "v2m_wildcard.yaml": """
domain: domain
descriptors:
  - key: user
    value_to_metric: true
    descriptors:
      - key: action
        value: read*
        value_to_metric: true
        descriptors: [{key: resource, rate_limit: {unit: minute, requests_per_unit: 100}}]
""",
    # TestWildcardStatsBehavior
    "ws_plain.yaml": """
domain: test-domain
descriptors: [{key: wild, value: foo*, rate_limit: {unit: minute, requests_per_unit: 20}}]
""",
    "ws_v2m.yaml": """
domain: test-domain
descriptors:
  - {key: wild, value: foo*, value_to_metric: true,
     rate_limit: {unit: minute, requests_per_unit: 20}}
""",
    "ws_share.yaml": """
domain: test-domain
descriptors:
  - {key: wild, value: foo*, share_threshold: true,
     rate_limit: {unit: minute, requests_per_unit: 20}}
""",
    "ws_share_v2m.yaml": """
domain: test-domain
descriptors:
  - {key: wild, value: foo*, share_threshold: true, value_to_metric: true,
     rate_limit: {unit: minute, requests_per_unit: 20}}
""",
    "ws_other.yaml": """
domain: test-domain
descriptors:
  - key: wild
    value: foo*
    descriptors:
      - key: other
        value_to_metric: true
        descriptors: [{key: limit, rate_limit: {unit: minute, requests_per_unit: 20}}]
""",
    "ws_mid_trailing.yaml": """
domain: test-domain
descriptors: [{key: wild, value: foo*bar*, rate_limit: {unit: minute, requests_per_unit: 20}}]
""",
    "ws_mid_trailing_v2m.yaml": """
domain: test-domain
descriptors:
  - {key: wild, value: foo*bar*, value_to_metric: true,
     rate_limit: {unit: minute, requests_per_unit: 20}}
""",
    # config_impl.go semantics without a fixture of their own
    "no_rpu.yaml": "domain: d\ndescriptors:\n  - {key: k, rate_limit: {unit: second}}\n",
    "unlimited_with_rpu.yaml": """
domain: d
descriptors: [{key: k, rate_limit: {unlimited: true, requests_per_unit: 5}}]
""",
    "share_no_wildcard.yaml": """
domain: d
descriptors:
  - {key: k, value: v, share_threshold: true, rate_limit: {unit: second, requests_per_unit: 1}}
""",
    "bool_values.yaml": """
domain: d
descriptors:
  - {key: flag, value: true, rate_limit: {unit: second, requests_per_unit: 1}}
  - {key: yes_no, value: yes, rate_limit: {unit: second, requests_per_unit: 2}}
  - {key: 123, value: 0x1F, rate_limit: {unit: second, requests_per_unit: 3}}
  - {key: nothing, value: , rate_limit: {unit: second, requests_per_unit: 4}}
""",
    "bool_flags.yaml": """
domain: d
descriptors:
  - {key: k, shadow_mode: yes, detailed_metric: on, quota_mode: y,
     rate_limit: {unit: second, requests_per_unit: 1}}
""",
    "float_value.yaml": """
domain: d
descriptors: [{key: k, value: 1.5, rate_limit: {unit: second, requests_per_unit: 1}}]
""",
    "quota.yaml": """
domain: d
descriptors: [{key: k, quota_mode: true, rate_limit: {unit: minute, requests_per_unit: 3}}]
""",
    # DIFFERS: upstream loads these; see the rejection table
    "wildcard_in_key.yaml": """
domain: d
descriptors: [{key: "a*", rate_limit: {unit: second, requests_per_unit: 1}}]
""",
    "misplaced_key.yaml": """
domain: d
descriptors:
  - {key: k, rate_limit: {unit: second, requests_per_unit: 1, shadow_mode: true}}
""",
    "unlimited_bad_unit.yaml": """
domain: d
descriptors: [{key: k, rate_limit: {unlimited: true, unit: fortnight}}]
""",
}

ALL = {**FIXTURES, **INLINE}


@pytest.fixture()
def load(tmp_path: Path) -> Any:
    def _load(*names: str, merge: bool = False) -> RateLimitConfig:
        paths = []
        for name in names:
            path = tmp_path / name
            path.write_text(ALL[name])
            paths.append(path)
        return load_files(paths, merge_domains=merge)

    return _load


# -- which fixtures load, which are rejected and why ----------------------------------------------

LOADS = [
    ("basic_config.yaml",),
    ("metadata.yaml",),
    ("shadowmode_config.yaml",),
    ("share_threshold.yaml",),
    ("wildcard.yaml",),
    ("merge_domain_key1.yaml",),
    ("merge_domain_key2.yaml",),
    ("duplicate_domain.yaml",),  # alone it is an empty domain, which is fine
    ("no_rpu.yaml",),
    ("unlimited_with_rpu.yaml",),
    ("bool_values.yaml",),
    ("bool_flags.yaml",),
    ("quota.yaml",),
    *((name,) for name in INLINE if name.startswith(("detailed_", "v2m_", "ws_"))),
]


@pytest.mark.parametrize("names", LOADS, ids=lambda n: "+".join(n))
def test_fixture_loads_as_upstream(load: Any, names: tuple[str, ...]) -> None:
    assert load(*names).domains


def test_domain_merge_loads_with_merge_on(load: Any) -> None:
    """TestDomainMerge: MERGE_DOMAIN_CONFIG=true joins two files of one domain."""
    config = load("merge_domain_key1.yaml", "merge_domain_key2.yaml", merge=True)
    assert _rpu(config.match("test-domain", [("key1", "value1")])) == 10
    assert _rpu(config.match("test-domain", [("key2", "value2")])) == 20
    assert config.match("foo_domain", [("key1", "value1")]) is None


# (files, merge, the file the message names, Legation's message, upstream's message)
REJECTS: list[tuple[tuple[str, ...], bool, str, str, str]] = [
    (
        ("bad_limit_unit.yaml",),
        False,
        "bad_limit_unit.yaml",
        "descriptors[0].rate_limit.unit: invalid rate limit unit 'foo' "
        "(one of second, minute, hour, day, week, month, year)",
        "invalid rate limit unit 'foo'",
    ),
    (
        ("bad_yaml.yaml",),
        False,
        "bad_yaml.yaml",
        "invalid YAML at line 2, column 1: found unexpected end of stream",
        "error loading config file: yaml: line 2: found unexpected end of stream",
    ),
    (
        ("basic_config.yaml", "duplicate_domain.yaml"),
        False,
        "duplicate_domain.yaml",
        "domain: duplicate domain 'test-domain' (already loaded from {dir}/basic_config.yaml; "
        "set merge_domains to merge them)",
        "duplicate domain 'test-domain' in config file",
    ),
    (
        ("merge_domain_key1.yaml", "merge_domain_key2.yaml"),
        False,
        "merge_domain_key2.yaml",
        "domain: duplicate domain 'test-domain' (already loaded from {dir}/merge_domain_key1.yaml; "
        "set merge_domains to merge them)",
        "duplicate domain 'test-domain' in config file",
    ),
    (
        ("duplicate_key.yaml",),
        False,
        "duplicate_key.yaml",
        "descriptors[1]: duplicate descriptor composite key 'test-domain.key1_value1'",
        "duplicate descriptor composite key 'test-domain.key1_value1'",
    ),
    (
        ("merge_domain_key1.yaml", "merge_domain_key1.yaml"),
        True,
        "merge_domain_key1.yaml",
        "descriptors[0]: duplicate descriptor composite key 'test-domain.key1_value1'",
        "duplicate descriptor composite key 'test-domain.key1_value1'",
    ),
    (
        ("empty_domain.yaml",),
        False,
        "empty_domain.yaml",
        "domain: the domain is required and must not be empty",
        "config file cannot have empty domain",
    ),
    (
        ("empty_key.yaml",),
        False,
        "empty_key.yaml",
        "descriptors[0].key: descriptor has no key",
        "descriptor has empty key",
    ),
    (
        ("misspelled_key.yaml",),
        False,
        "misspelled_key.yaml",
        "descriptors[0]: unknown key 'ratelimit'",
        "config error, unknown key 'ratelimit'",
    ),
    (
        ("misspelled_key2.yaml",),
        False,
        "misspelled_key2.yaml",
        "descriptors[0].rate_limit: unknown key 'requestsperunit'",
        "config error, unknown key 'requestsperunit'",
    ),
    (
        ("non_map_list.yaml",),
        False,
        "non_map_list.yaml",
        "descriptors[0]: expected a mapping, got 'a'",
        "config error, yaml file contains list of type other than map: a",
    ),
    (
        ("non_string_key.yaml",),
        False,
        "non_string_key.yaml",
        "a key must be a string, got 0.25",
        "config error, key is not of type string: 0.25",
    ),
    (
        ("replaces_empty.yaml",),
        False,
        "replaces_empty.yaml",
        "descriptors[0].descriptors[0].rate_limit.replaces[0].name: replaces needs a name",
        "should not have an empty replaces entry",
    ),
    (
        ("replaces_self.yaml",),
        False,
        "replaces_self.yaml",
        "descriptors[0].descriptors[0].rate_limit.replaces[0].name: a rate limit cannot replace "
        "itself ('self')",
        "replaces should not contain name of same descriptor",
    ),
    (
        ("unlimited_with_unit.yaml",),
        False,
        "unlimited_with_unit.yaml",
        "descriptors[0].rate_limit.unit: an unlimited rate limit must not set a unit",
        "should not specify rate limit unit when unlimited",
    ),
    (
        ("share_no_wildcard.yaml",),
        False,
        "share_no_wildcard.yaml",
        "descriptors[0].share_threshold: share_threshold needs a wildcard value (containing '*'), "
        "got key 'k_v'",
        "share_threshold can only be used with wildcard values (containing '*'), but found key "
        "'k_v'",
    ),
    (
        ("float_value.yaml",),
        False,
        "float_value.yaml",
        "descriptors[0].value: expected a string, got the number 1.5 (quote it)",
        "error checking config",
    ),
    # DIFFERS: upstream lets a `*` in a key match other keys by prefix (an accident of joining
    # key and value into one string); Legation allows wildcards in values only.
    (
        ("wildcard_in_key.yaml",),
        False,
        "wildcard_in_key.yaml",
        "descriptors[0].key: a key cannot hold a wildcard ('a*'); only values can",
        "(loads)",
    ),
    # DIFFERS: upstream checks key names against one flat list, so a key at the wrong level
    # (shadow_mode inside rate_limit) is silently ignored; Legation names it.
    (
        ("misplaced_key.yaml",),
        False,
        "misplaced_key.yaml",
        "descriptors[0].rate_limit: unknown key 'shadow_mode'",
        "(loads, shadow mode ignored)",
    ),
    # DIFFERS: upstream ignores an invalid unit next to `unlimited: true`.
    (
        ("unlimited_bad_unit.yaml",),
        False,
        "unlimited_bad_unit.yaml",
        "descriptors[0].rate_limit.unit: an unlimited rate limit must not set a unit",
        "(loads)",
    ),
]


@pytest.mark.parametrize("case", REJECTS, ids=lambda c: "+".join(c[0]) + ("/merge" if c[1] else ""))
def test_fixture_rejected_as_upstream(
    load: Any, tmp_path: Path, case: tuple[tuple[str, ...], bool, str, str, str]
) -> None:
    names, merge, named, message, _upstream = case
    with pytest.raises(ConfigError) as info:
        load(*names, merge=merge)
    assert str(info.value) == f"{tmp_path / named}: {message.replace('{dir}', str(tmp_path))}"


# -- lookups: GetLimit(domain, entries) -> limit and stats key ------------------------------------

Entries = tuple[tuple[str, str], ...]
# (files, domain, entries, None or (requests_per_unit, unit, stats key))
LOOKUPS: list[tuple[str, str, Entries, tuple[int, str, str] | None]] = [
    # TestBasicConfig
    ("basic_config.yaml", "foo_domain", (("key1", "value1"),), None),
    ("basic_config.yaml", "test-domain", (("key1", "something"),), None),
    ("basic_config.yaml", "test-domain", (("key1", "value1"),), None),
    ("basic_config.yaml", "test-domain", (("key2", "value2"), ("subkey", "subvalue")), None),
    ("basic_config.yaml", "test-domain", (("key5", "value5"), ("subkey5", "subvalue")), None),
    (
        "basic_config.yaml",
        "test-domain",
        (("key1", "value1"), ("subkey1", "something")),
        (5, "second", "test-domain.key1_value1.subkey1"),
    ),
    (
        "basic_config.yaml",
        "test-domain",
        (("key1", "value1"), ("subkey1", "subvalue1")),
        (10, "second", "test-domain.key1_value1.subkey1_subvalue1"),
    ),
    (
        "basic_config.yaml",
        "test-domain",
        (("key2", "something"),),
        (20, "minute", "test-domain.key2"),
    ),
    (
        "basic_config.yaml",
        "test-domain",
        (("key2", "value2"),),
        (30, "minute", "test-domain.key2_value2"),
    ),
    ("basic_config.yaml", "test-domain", (("key2", "value3"),), None),
    ("basic_config.yaml", "test-domain", (("key3", "foo"),), (1, "hour", "test-domain.key3")),
    ("basic_config.yaml", "test-domain", (("key4", "foo"),), (1, "day", "test-domain.key4")),
    (
        "basic_config.yaml",
        "test-domain",
        (("key5", "value5"),),
        (15, "day", "test-domain.key5_value5"),
    ),
    (
        "basic_config.yaml",
        "test-domain",
        (("key5", "value5"), ("subkey5", "subvalue5")),
        (25, "day", "test-domain.key5_value5.subkey5_subvalue5"),
    ),
    (
        "basic_config.yaml",
        "test-domain",
        (("key7", "unspecified_value"),),
        (70, "minute", "test-domain.key7_unspecified_value"),
    ),
    (
        "basic_config.yaml",
        "test-domain",
        (("key7", "another_value"),),
        (70, "minute", "test-domain.key7_another_value"),
    ),
    # TestShadowModeConfig
    (
        "shadowmode_config.yaml",
        "test-domain",
        (("key1", "value1"), ("subkey1", "something")),
        (5, "second", "test-domain.key1_value1.subkey1"),
    ),
    (
        "shadowmode_config.yaml",
        "test-domain",
        (("key1", "value1"), ("subkey1", "subvalue1")),
        (10, "second", "test-domain.key1_value1.subkey1_subvalue1"),
    ),
    (
        "shadowmode_config.yaml",
        "test-domain",
        (("key2", "something"),),
        (20, "minute", "test-domain.key2"),
    ),
    (
        "shadowmode_config.yaml",
        "test-domain",
        (("key2", "value2"),),
        (30, "minute", "test-domain.key2_value2"),
    ),
    # TestWildcardConfig
    ("wildcard.yaml", "test-domain", (("noVal", "foo1"),), (20, "minute", "test-domain.noVal")),
    ("wildcard.yaml", "test-domain", (("noVal", "foo2"),), (20, "minute", "test-domain.noVal")),
    ("wildcard.yaml", "test-domain", (("wild", "foo1"),), (20, "minute", "test-domain.wild_foo*")),
    ("wildcard.yaml", "test-domain", (("wild", "foo2"),), (20, "minute", "test-domain.wild_foo*")),
    (
        "wildcard.yaml",
        "test-domain",
        (("nestedWild", "val1"), ("wild", "goo2")),
        (20, "minute", "test-domain.nestedWild_val1.wild_goo*"),
    ),
    ("wildcard.yaml", "test-domain", (("wild", "bar"),), None),
    ("wildcard.yaml", "test-domain", (("noWild", "foo1"),), None),
    (
        "wildcard.yaml",
        "test-domain",
        (("midWild", "barab"),),
        (20, "minute", "test-domain.midWild_bar*b"),
    ),
    (
        "wildcard.yaml",
        "test-domain",
        (("midWild", "bar123b"),),
        (20, "minute", "test-domain.midWild_bar*b"),
    ),
    (
        "wildcard.yaml",
        "test-domain",
        (("midWild", "barb"),),
        (20, "minute", "test-domain.midWild_bar*b"),
    ),
    ("wildcard.yaml", "test-domain", (("midWild", "bara"),), None),
    ("wildcard.yaml", "test-domain", (("midWild", "xbarb"),), None),
    (
        "wildcard.yaml",
        "test-domain",
        (("multiWild", "foo123bar456baz"),),
        (10, "minute", "test-domain.multiWild_foo*bar*baz"),
    ),
    (
        "wildcard.yaml",
        "test-domain",
        (("multiWild", "foobarbaz"),),
        (10, "minute", "test-domain.multiWild_foo*bar*baz"),
    ),
    ("wildcard.yaml", "test-domain", (("multiWild", "foo123baz"),), None),
    ("wildcard.yaml", "test-domain", (("multiWild", "bar456baz"),), None),
    # TestDetailedMetric
    (
        "detailed_top.yaml",
        "nested",
        (("key-1", "value-1"),),
        (100, "minute", "nested.key-1_value-1"),
    ),
    ("detailed_none.yaml", "nested", (("key-1", "value-1"),), (100, "minute", "nested.key-1")),
    (
        "detailed_both.yaml",
        "nested",
        (("key-1", "value-1"), ("key-2", "value-2")),
        (5, "minute", "nested.key-1_value-1.key-2_value-2"),
    ),
    (
        "detailed_none.yaml",
        "nested",
        (("key-1", "value-1"), ("key-2", "value-2")),
        (5, "minute", "nested.key-1.key-2"),
    ),
    (
        "detailed_realistic.yaml",
        "nested",
        (("key_1", "value-for-key-1"),),
        (500, "minute", "nested.key_1_value-for-key-1"),
    ),
    (
        "detailed_realistic.yaml",
        "nested",
        (("key_2", "key-2-value"),),
        (5000, "minute", "nested.key_2_key-2-value"),
    ),
    (
        "detailed_realistic.yaml",
        "nested",
        (("key_2", "key-2-value"), ("key_3", "requested-key3-value")),
        (5, "minute", "nested.key_2_key-2-value.key_3_requested-key3-value"),
    ),
    # TestValueToMetric_*
    (
        "v2m_runtime.yaml",
        "domain",
        (("route", "draw"), ("http_method", "GET"), ("subject_id", "123")),
        (60, "minute", "domain.route_draw.http_method_GET.subject_id"),
    ),
    ("v2m_default.yaml", "d", (("k1", "A"), ("k2", "foo")), (1, "second", "d.k1_A.k2")),
    ("v2m_mid.yaml", "d", (("k1", "X"), ("k2", "Y"), ("k3", "Z")), (1, "second", "d.k1.k2_Y.k3")),
    ("v2m_none.yaml", "d", (("k1", "X"), ("k2", "Y")), (1, "second", "d.k1.k2")),
    (
        "v2m_detailed.yaml",
        "domain",
        (("route", "draw"), ("http_method", "GET"), ("subject_id", "123")),
        (60, "minute", "domain.route_draw.http_method_GET.subject_id_123"),
    ),
    (
        "v2m_configured.yaml",
        "test-domain",
        (("route", "api"), ("http_method", "GET"), ("subject_id", "user123")),
        (60, "minute", "test-domain.route_api.http_method_GET.subject_id"),
    ),
    (
        "v2m_configured.yaml",
        "test-domain",
        (("route", "api"), ("http_method", "POST"), ("subject_id", "user456")),
        (30, "minute", "test-domain.route_api.http_method_POST.subject_id"),
    ),
    (
        "v2m_wildcard.yaml",
        "domain",
        (("user", "alice"), ("action", "readfile"), ("resource", "documents")),
        (100, "minute", "domain.user_alice.action_readfile.resource"),
    ),
    (
        "v2m_wildcard.yaml",
        "domain",
        (("user", "bob"), ("action", "readdata"), ("resource", "database")),
        (100, "minute", "domain.user_bob.action_readdata.resource"),
    ),
    (
        "v2m_runtime.yaml",
        "domain",
        (("route", ""), ("http_method", "GET"), ("subject_id", "123")),
        (60, "minute", "domain.route.http_method_GET.subject_id"),
    ),
    (
        "v2m_runtime.yaml",
        "domain",
        (("route", "draw"), ("http_method", ""), ("subject_id", "123")),
        (60, "minute", "domain.route_draw.http_method.subject_id"),
    ),
    (
        "v2m_runtime.yaml",
        "domain",
        (("route", ""), ("http_method", ""), ("subject_id", "123")),
        (60, "minute", "domain.route.http_method.subject_id"),
    ),
    # TestShareThreshold
    (
        "share_threshold.yaml",
        "test-domain",
        (("files", "files/a.pdf"),),
        (100, "minute", "test-domain.files_files/*"),
    ),
    (
        "share_threshold.yaml",
        "test-domain",
        (("files", "files/c.txt"),),
        (100, "minute", "test-domain.files_files/*"),
    ),
    (
        "share_threshold.yaml",
        "test-domain",
        (("route", "api/v1"), ("method", "GET")),
        (60, "minute", "test-domain.route_api/*.method"),
    ),
    (
        "share_threshold.yaml",
        "test-domain",
        (("service", "svc/user"), ("endpoint", "get")),
        (80, "minute", "test-domain.service_svc/*.endpoint_get"),
    ),
    (
        "share_threshold.yaml",
        "test-domain",
        (("nested", "parent"), ("files", "nested/file1.txt")),
        (200, "minute", "test-domain.nested_parent.files_nested/*"),
    ),
    (
        "share_threshold.yaml",
        "test-domain",
        (("files", "top/file1.txt"), ("files", "nested/file1.txt")),
        (300, "minute", "test-domain.files_top/*.files_nested/*"),
    ),
    (
        "share_threshold.yaml",
        "test-domain",
        (("path", "path/foo"), ("file", "file/doc1"), ("type", "pdf")),
        (120, "minute", "test-domain.path_path/*.file_file/*.type"),
    ),
    (
        "share_threshold.yaml",
        "test-domain",
        (("user", "user/alice"), ("resource", "res/file1"), ("action", "read")),
        (150, "minute", "test-domain.user_user/*.resource_res/*.action"),
    ),
    (
        "share_threshold.yaml",
        "test-domain",
        (("file", "test1"),),
        (50, "minute", "test-domain.file_test1"),
    ),
    (
        "share_threshold.yaml",
        "test-domain",
        (("file", "test23"),),
        (100, "minute", "test-domain.file_test*"),
    ),
    (
        "share_threshold.yaml",
        "test-domain",
        (("midpath", "/api-beta-v1"),),
        (100, "minute", "test-domain.midpath_/api*v1"),
    ),
    ("share_threshold.yaml", "test-domain", (("midpath", "/api/v2"),), None),
    (
        "share_threshold.yaml",
        "test-domain",
        (("multiroute", "svceprpc"),),
        (50, "minute", "test-domain.multiroute_svc*ep*rpc"),
    ),
    ("share_threshold.yaml", "test-domain", (("multiroute", "svcABCrpc"),), None),
    (
        "share_threshold.yaml",
        "test-domain",
        (("midroute", "/api-beta-v2"),),
        (80, "minute", "test-domain.midroute_/api*v2"),
    ),
    (
        "share_threshold.yaml",
        "test-domain",
        (("tenant", "t99prod"), ("resource", "resBBBv2")),
        (60, "minute", "test-domain.tenant_t*prod.resource_res*v2"),
    ),
    # TestWildcardStatsBehavior
    ("ws_plain.yaml", "test-domain", (("wild", "foo1"),), (20, "minute", "test-domain.wild_foo*")),
    ("ws_v2m.yaml", "test-domain", (("wild", "foo1"),), (20, "minute", "test-domain.wild_foo1")),
    ("ws_share.yaml", "test-domain", (("wild", "foo1"),), (20, "minute", "test-domain.wild_foo*")),
    (
        "ws_share_v2m.yaml",
        "test-domain",
        (("wild", "foo1"),),
        (20, "minute", "test-domain.wild_foo*"),
    ),
    (
        "ws_other.yaml",
        "test-domain",
        (("wild", "foo1"), ("other", "bar"), ("limit", "X")),
        (20, "minute", "test-domain.wild_foo*.other_bar.limit"),
    ),
    (
        "ws_mid_trailing.yaml",
        "test-domain",
        (("wild", "fooXbarY"),),
        (20, "minute", "test-domain.wild_foo*bar*"),
    ),
    (
        "ws_mid_trailing_v2m.yaml",
        "test-domain",
        (("wild", "foo123bar456"),),
        (20, "minute", "test-domain.wild_foo123bar456"),
    ),
    # TestMetadata
    (
        "metadata.yaml",
        "test-domain",
        (("key1", "value1"), ("subkey1", "something")),
        (5, "second", "test-domain.key1_value1.subkey1"),
    ),
    ("metadata.yaml", "test-domain", (("key2", "something"),), (20, "minute", "test-domain.key2")),
    # config_impl.go: a missing requests_per_unit is 0 (everything over the limit); YAML 1.1
    # scalars in a value are matched as written (yaml.v2 decodes them into the string field)
    ("no_rpu.yaml", "d", (("k", "x"),), (0, "second", "d.k")),
    ("bool_values.yaml", "d", (("flag", "true"),), (1, "second", "d.flag_true")),
    ("bool_values.yaml", "d", (("flag", "True"),), None),
    ("bool_values.yaml", "d", (("yes_no", "yes"),), (2, "second", "d.yes_no_yes")),
    ("bool_values.yaml", "d", (("123", "0x1F"),), (3, "second", "d.123_0x1F")),
    ("bool_values.yaml", "d", (("nothing", "any"),), (4, "second", "d.nothing")),
]


def _rpu(match: Match | None) -> int | None:
    return None if match is None else match.limits[0].requests_per_unit


@pytest.mark.parametrize("case", LOOKUPS, ids=lambda c: f"{c[0]}:{'/'.join(map('='.join, c[2]))}")
def test_lookup_as_upstream(load: Any, case: Any) -> None:
    name, domain, entries, expected = case
    match = load(name).match(domain, list(entries))
    if expected is None:
        assert match is None
        return
    assert match is not None
    rpu, unit, stats_key = expected
    limit = match.limits[0]
    assert (limit.requests_per_unit, limit.unit, match.metric_key) == (rpu, unit, stats_key)


def test_basic_config_names_and_unlimited(load: Any) -> None:
    """TestBasicConfig: key4's limit carries its name, key3's has none, key6 is unlimited."""
    config = load("basic_config.yaml")
    assert config.match("test-domain", [("key4", "foo")]).limits[0].name == "key4_rate_limit"
    assert config.match("test-domain", [("key3", "foo")]).limits[0].name == ""
    assert config.match("test-domain", [("key6", "foo")]).limits[0].unlimited


@pytest.mark.parametrize(
    ("entries", "shadow"),
    [
        ((("key1", "value1"), ("subkey1", "something")), False),
        ((("key1", "value1"), ("subkey1", "subvalue1")), True),
        ((("key2", "something"),), True),
        ((("key2", "value2"),), False),
    ],
)
def test_shadow_mode_per_descriptor(load: Any, entries: Entries, shadow: bool) -> None:
    """TestShadowModeConfig: rl.ShadowMode per matched descriptor."""
    match = load("shadowmode_config.yaml").match("test-domain", list(entries))
    assert match.descriptor.shadow_mode is shadow


@pytest.mark.parametrize(
    ("entries", "shared"),
    [
        ((("files", "files/a.pdf"),), ("files/*",)),
        ((("route", "api/v1"), ("method", "GET")), ("api/*", "")),
        ((("files", "top/a"), ("files", "nested/b")), ("top/*", "nested/*")),
        ((("path", "path/foo"), ("file", "file/doc1"), ("type", "pdf")), ("path/*", "", "")),
        ((("file", "test1"),), ()),
        ((("file", "test2"),), ("test*",)),
        ((("tenant", "t1prod"), ("resource", "resAv2")), ("t*prod", "res*v2")),
    ],
)
def test_share_threshold_patterns(load: Any, entries: Entries, shared: tuple[str, ...]) -> None:
    """TestShareThreshold: ShareThresholdKeyPattern per entry (what the counter key uses)."""
    match = load("share_threshold.yaml").match("test-domain", list(entries))
    assert match.shared == shared


def test_metadata_of_matched_descriptor(load: Any) -> None:
    """TestMetadata: the matched descriptor's metadata, nested maps kept."""
    config = load("metadata.yaml")
    sub = config.match("test-domain", [("key1", "value1"), ("subkey1", "something")])
    assert sub.descriptor.metadata == {"name": "service_1"}
    top = config.match("test-domain", [("key2", "something")])
    assert top.descriptor.metadata == {"service_with_quota": {"name": "service_2"}}
    other = config.match("test-domain", [("key1", "value1"), ("subkey1", "subvalue1")])
    assert other.descriptor.metadata is None


def test_yaml_11_booleans_in_flags(load: Any) -> None:
    """yaml.v2 (YAML 1.1) reads yes/on/y as true in boolean fields."""
    node = load("bool_flags.yaml").match("d", [("k", "v")]).descriptor
    assert (node.shadow_mode, node.detailed_metric, node.quota_mode) == (True, True, True)


def test_unlimited_with_requests_per_unit_is_unlimited(load: Any) -> None:
    assert load("unlimited_with_rpu.yaml").match("d", [("k", "x")]).limits[0].unlimited
