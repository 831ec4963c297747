"""envoyproxy/ratelimit configuration, loaded unchanged, plus what Legation adds on top.

The file format is envoyproxy/ratelimit's (one domain per file)::

    domain: <unique domain>
    descriptors:
      - key: <required>
        value: <optional; a trailing * matches by prefix>
        rate_limit: {unit, requests_per_unit, unlimited, name, replaces: [{name}]}
        shadow_mode: <bool>
        detailed_metric: <bool>
        descriptors: [...]            # nested, same shape

Additions (ignored by nobody, since unknown keys are errors in both implementations):

* ``algorithm`` inside a rate limit: ``fixed_window`` (default, the compatible one),
  ``sliding_window`` or ``token_bucket``;
* ``rate_limits: [...]`` next to (or instead of) ``rate_limit``: several limits on one descriptor,
  e.g. 10 per second and 1,000 per hour, all of which must pass.

Loading runs two passes, like envoyproxy/ratelimit: unknown keys and wrong types first, then the
semantic checks (units, unlimited, duplicates). Every message starts with the file name and the
field path, e.g. ``limits.yaml: descriptors[0].rate_limit.unit: invalid unit 'sec' ...``.
Matching (:meth:`RateLimitConfig.match`) follows the reference: a request descriptor with N entries
matches a config descriptor N levels deep, trying at each level key+value, then a wildcard value,
then key alone.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from legation import _yaml
from legation.errors import ConfigError

UNIT_SECONDS: Mapping[str, int] = {
    "second": 1,
    "minute": 60,
    "hour": 3600,
    "day": 86400,
    "week": 7 * 86400,
    "month": 30 * 86400,
    "year": 365 * 86400,
}


class Algorithm(enum.StrEnum):
    FIXED_WINDOW = "fixed_window"
    SLIDING_WINDOW = "sliding_window"
    TOKEN_BUCKET = "token_bucket"


@dataclass(frozen=True, slots=True, kw_only=True)
class Limit:
    """One limit: ``requests_per_unit`` per ``unit``, counted with ``algorithm``."""

    unit: str = ""
    requests_per_unit: int = 0
    algorithm: Algorithm = Algorithm.FIXED_WINDOW
    name: str = ""
    replaces: frozenset[str] = frozenset()
    unlimited: bool = False

    @property
    def window_ms(self) -> int:
        return UNIT_SECONDS[self.unit] * 1000


@dataclass(frozen=True, slots=True, kw_only=True)
class Descriptor:
    """A node of the descriptor tree. ``value`` is "" (any value) or may end with ``*``."""

    key: str
    value: str = ""
    limits: tuple[Limit, ...] = ()
    shadow_mode: bool = False
    detailed_metric: bool = False
    children: DescriptorTable = field(default_factory=lambda: DescriptorTable())


@dataclass(frozen=True, slots=True)
class DescriptorTable:
    """The descriptors of one level, indexed the way matching looks them up."""

    exact: Mapping[tuple[str, str], Descriptor] = field(default_factory=dict)
    wildcards: tuple[tuple[str, str, Descriptor], ...] = ()  # (key, value prefix, node)
    any_value: Mapping[str, Descriptor] = field(default_factory=dict)

    def lookup(self, key: str, value: str) -> Descriptor | None:
        node = self.exact.get((key, value))
        if node is not None:
            return node
        for wkey, prefix, wnode in self.wildcards:
            if wkey == key and value.startswith(prefix):
                return wnode
        return self.any_value.get(key)


@dataclass(frozen=True, slots=True)
class Match:
    """A request descriptor's matched config node, with its metric name (``domain.k_v.k``)."""

    descriptor: Descriptor
    metric_key: str

    @property
    def limits(self) -> tuple[Limit, ...]:
        return self.descriptor.limits


@dataclass(frozen=True, slots=True)
class DomainConfig:
    domain: str
    source: str
    descriptors: DescriptorTable


@dataclass(frozen=True, slots=True)
class RateLimitConfig:
    """Every loaded domain. Immutable: a reload builds a new one and swaps the reference."""

    domains: Mapping[str, DomainConfig] = field(default_factory=dict)

    def match(self, domain: str, entries: Sequence[tuple[str, str]]) -> Match | None:
        """The config descriptor for ``entries`` (key, value pairs); None if nothing limits it."""
        config = self.domains.get(domain)
        if config is None or not entries:
            return None
        table = config.descriptors
        parts = [domain]
        node: Descriptor | None = None
        for key, value in entries:
            if table is None:
                return None
            node = table.lookup(key, value)
            if node is None:
                return None
            if node.detailed_metric or node.value:
                parts.append(f"{key}_{value if node.detailed_metric else node.value}")
            else:
                parts.append(key)
            table = node.children
        if node is None or not node.limits:
            return None
        return Match(node, ".".join(parts))


_DESCRIPTOR_KEYS = frozenset(
    {"key", "value", "rate_limit", "rate_limits", "descriptors", "shadow_mode", "detailed_metric"}
)
_LIMIT_KEYS = frozenset({"unit", "requests_per_unit", "unlimited", "name", "replaces", "algorithm"})


def load_files(paths: Iterable[str | Path]) -> RateLimitConfig:
    """Load every file (one domain each). Domains must be unique across files."""
    return _combine(load_file(path) for path in paths)


def load_texts(texts: Iterable[tuple[str, str]]) -> RateLimitConfig:
    """Like :func:`load_files` from ``(source, text)`` pairs already read (the watcher's case)."""
    return _combine(parse(text, source=source) for source, text in texts)


def _combine(loaded_domains: Iterable[DomainConfig]) -> RateLimitConfig:
    domains: dict[str, DomainConfig] = {}
    for loaded in loaded_domains:
        other = domains.get(loaded.domain)
        if other is not None:
            raise ConfigError(
                f"{loaded.source}: domain: duplicate domain {loaded.domain!r} "
                f"(already loaded from {other.source})",
                code="duplicate_domain",
            )
        domains[loaded.domain] = loaded
    return RateLimitConfig(domains)


def load_file(path: str | Path) -> DomainConfig:
    path = Path(path)
    try:
        text = _yaml.read_text(path)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}",
                          code="unreadable") from None
    return parse(text, source=str(path))


def parse(text: str, *, source: str = "<string>") -> DomainConfig:
    """Parse one file's text; ``source`` names it in every error."""
    raw = _yaml.load(text, source=source)  # bounded: aliases, size, depth
    return _Parser(source).domain(raw)


class _Parser:
    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, where: str, message: str, code: str = "invalid_config") -> ConfigError:
        return ConfigError(f"{self.source}: {where}: {message}" if where else
                           f"{self.source}: {message}", code=code)

    def mapping(self, raw: Any, where: str, allowed: frozenset[str]) -> Mapping[str, Any]:
        if not isinstance(raw, Mapping):
            raise self.fail(where, f"expected a mapping, got {type(raw).__name__}")
        for key in raw:
            if key not in allowed:
                raise self.fail(where, f"unknown key {key!r}", "unknown_key")
        return raw

    def typed(self, raw: Mapping[str, Any], name: str, where: str, kind: type, default: Any) -> Any:
        value = raw.get(name)
        if value is None:
            return default
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        if not ok:
            raise self.fail(f"{where}.{name}" if where else name,
                            f"expected {kind.__name__}, got {value!r}", "invalid_type")
        return value

    def domain(self, raw: Any) -> DomainConfig:
        if raw is None:
            raise self.fail("", "empty file", "missing_domain")
        raw = self.mapping(raw, "", frozenset({"domain", "descriptors"}))
        domain = self.typed(raw, "domain", "", str, "")
        if not domain:
            raise self.fail("domain", "the domain is required and must not be empty",
                            "missing_domain")
        descriptors = self.typed(raw, "descriptors", "", list, [])
        return DomainConfig(domain, self.source, self.table(descriptors or [], "descriptors"))

    def table(self, items: list[Any], where: str) -> DescriptorTable:
        exact: dict[tuple[str, str], Descriptor] = {}
        wildcards: list[tuple[str, str, Descriptor]] = []
        any_value: dict[str, Descriptor] = {}
        seen: set[tuple[str, str]] = set()
        for i, item in enumerate(items):
            here = f"{where}[{i}]"
            node = self.descriptor(item, here)
            composite = (node.key, node.value)
            if composite in seen:
                shown = f"{node.key}_{node.value}" if node.value else node.key
                raise self.fail(here, f"duplicate descriptor composite key {shown!r}",
                                "duplicate_descriptor")
            seen.add(composite)
            if not node.value:
                any_value[node.key] = node
            elif node.value.endswith("*"):
                wildcards.append((node.key, node.value[:-1], node))
            else:
                exact[composite] = node
        return DescriptorTable(exact, tuple(wildcards), any_value)

    def descriptor(self, raw: Any, where: str) -> Descriptor:
        raw = self.mapping(raw, where, _DESCRIPTOR_KEYS)
        key = self.typed(raw, "key", where, str, "")
        if not key:
            raise self.fail(f"{where}.key", "descriptor has no key", "missing_key")
        value = raw.get("value", "")
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise self.fail(f"{where}.value", f"expected a string, got {value!r}", "invalid_type")
        limits: list[Limit] = []
        if raw.get("rate_limit") is not None:
            limits.append(self.limit(raw["rate_limit"], f"{where}.rate_limit"))
        extra = self.typed(raw, "rate_limits", where, list, [])
        for i, item in enumerate(extra or []):
            limits.append(self.limit(item, f"{where}.rate_limits[{i}]"))
        if any(lim.unlimited for lim in limits) and len(limits) > 1:
            raise self.fail(where, "an unlimited rate limit cannot be combined with other limits",
                            "unlimited_with_limits")
        windows = [(lim.unit, lim.algorithm) for lim in limits]
        if len(set(windows)) != len(windows):
            raise self.fail(where, "two limits with the same unit and algorithm (they would share "
                            "one counter)", "duplicate_limit")
        children = self.typed(raw, "descriptors", where, list, [])
        return Descriptor(
            key=key,
            value=str(value),
            limits=tuple(limits),
            shadow_mode=self.typed(raw, "shadow_mode", where, bool, False),
            detailed_metric=self.typed(raw, "detailed_metric", where, bool, False),
            children=self.table(children or [], f"{where}.descriptors"),
        )

    def limit(self, raw: Any, where: str) -> Limit:
        raw = self.mapping(raw, where, _LIMIT_KEYS)
        unlimited = self.typed(raw, "unlimited", where, bool, False)
        unit = self.typed(raw, "unit", where, str, "")
        rpu = self.typed(raw, "requests_per_unit", where, int, None)
        name = self.typed(raw, "name", where, str, "")
        algorithm_raw = self.typed(raw, "algorithm", where, str, Algorithm.FIXED_WINDOW.value)
        replaces = self.replaces(raw.get("replaces"), f"{where}.replaces")
        if unlimited:
            if unit or rpu is not None:
                raise self.fail(where, "an unlimited rate limit must not set unit or "
                                "requests_per_unit", "unlimited_with_unit")
            return Limit(unlimited=True, name=name, replaces=replaces)
        unit = unit.lower()
        if unit not in UNIT_SECONDS:
            raise self.fail(f"{where}.unit", f"invalid rate limit unit {unit!r} "
                            f"(one of {', '.join(UNIT_SECONDS)})", "invalid_unit")
        if rpu is None:
            raise self.fail(f"{where}.requests_per_unit", "requests_per_unit is required",
                            "missing_requests_per_unit")
        if rpu < 0 or rpu > 0xFFFFFFFF:
            raise self.fail(f"{where}.requests_per_unit", f"must be 0..4294967295, got {rpu}",
                            "invalid_requests_per_unit")
        try:
            algorithm = Algorithm(algorithm_raw)
        except ValueError:
            raise self.fail(f"{where}.algorithm", f"unknown algorithm {algorithm_raw!r} "
                            f"(one of {', '.join(a.value for a in Algorithm)})",
                            "invalid_algorithm") from None
        return Limit(unit=unit, requests_per_unit=rpu, algorithm=algorithm, name=name,
                     replaces=replaces)

    def replaces(self, raw: Any, where: str) -> frozenset[str]:
        if raw is None:
            return frozenset()
        if not isinstance(raw, list):
            raise self.fail(where, f"expected a list, got {type(raw).__name__}", "invalid_type")
        names = set()
        for i, item in enumerate(raw):
            item = self.mapping(item, f"{where}[{i}]", frozenset({"name"}))
            name = self.typed(item, "name", f"{where}[{i}]", str, "")
            if not name:
                raise self.fail(f"{where}[{i}].name", "replaces needs a name", "missing_name")
            names.add(name)
        return frozenset(names)
