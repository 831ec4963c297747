"""envoyproxy/ratelimit configuration, loaded unchanged, plus what Legation adds on top.

The file format is envoyproxy/ratelimit's (one domain per file; several files of one domain are
merged with ``merge_domains``, upstream's ``MERGE_DOMAIN_CONFIG``)::

    domain: <unique domain>
    descriptors:
      - key: <required>
        value: <optional; each * matches zero or more characters, anywhere in the value>
        rate_limit: {unit, requests_per_unit (default 0), unlimited, name, replaces: [{name}]}
        shadow_mode, quota_mode, detailed_metric, value_to_metric, share_threshold: <bool>
        metadata: <mapping, returned in the response's dynamic metadata>
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
matches a config descriptor N levels deep, trying at each level key+value, then the wildcard values
in the order written, then key alone. The stats key of a match is upstream's (``detailed_metric``,
``value_to_metric`` and ``share_threshold`` shape it the same way).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from legation import _yaml
from legation.errors import ConfigError
from legation.ratelimit import _scalars

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
    """A node of the descriptor tree. ``value`` is "" (any value), literal, or a wildcard."""

    key: str
    value: str = ""
    limits: tuple[Limit, ...] = ()
    shadow_mode: bool = False
    quota_mode: bool = False
    detailed_metric: bool = False
    value_to_metric: bool = False
    share_threshold: bool = False
    metadata: Mapping[str, Any] | None = None
    children: DescriptorTable = field(default_factory=lambda: DescriptorTable())

    @property
    def composite(self) -> str:
        """Upstream's name for the node at its level: ``key`` or ``key_value``."""
        return f"{self.key}_{self.value}" if self.value else self.key


class How(enum.IntEnum):
    """How a request entry met its config node (what the stats key shows of the value)."""

    EXACT = 0
    WILDCARD = 1
    KEY_ONLY = 2


@dataclass(frozen=True, slots=True)
class DescriptorTable:
    """The descriptors of one level, indexed the way matching looks them up. ``items`` keeps the
    declaration order (wildcards are tried in it, and domain merging rebuilds from it)."""

    exact: Mapping[tuple[str, str], Descriptor] = field(default_factory=dict)
    wildcards: tuple[tuple[str, tuple[str, ...], Descriptor], ...] = ()  # (key, parts, node)
    any_value: Mapping[str, Descriptor] = field(default_factory=dict)
    items: tuple[Descriptor, ...] = ()

    @classmethod
    def of(cls, items: Iterable[Descriptor]) -> DescriptorTable:
        """The table of ``items`` (composite keys already checked unique by the parser)."""
        exact: dict[tuple[str, str], Descriptor] = {}
        wildcards: list[tuple[str, tuple[str, ...], Descriptor]] = []
        any_value: dict[str, Descriptor] = {}
        items = tuple(items)
        for node in items:
            if not node.value:
                any_value[node.key] = node
            elif "*" in node.value:
                wildcards.append((node.key, _scalars.wildcard_parts(node.value), node))
            else:
                exact[(node.key, node.value)] = node
        return cls(exact, tuple(wildcards), any_value, items)

    def lookup(self, key: str, value: str) -> tuple[Descriptor, How] | None:
        node = self.exact.get((key, value))
        if node is not None:
            return node, How.EXACT
        for wkey, parts, wnode in self.wildcards:
            if wkey == key and _scalars.wildcard_match(parts, value):
                return wnode, How.WILDCARD
        node = self.any_value.get(key)
        return None if node is None else (node, How.KEY_ONLY)


@dataclass(frozen=True, slots=True)
class Match:
    """A request descriptor's matched config node, with its stats key (``domain.k_v.k``) and, for
    entries matched by a ``share_threshold`` wildcard, the pattern that replaces the value in the
    counter key (``shared[i]``; "" for other entries; empty when no entry shares)."""

    descriptor: Descriptor
    metric_key: str
    shared: tuple[str, ...] = ()

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
        table: DescriptorTable | None = config.descriptors
        shown: list[str] = []  # value_to_metric-style stats key parts
        shared = [""] * len(entries)
        node: Descriptor | None = None
        for i, (key, value) in enumerate(entries):
            found = table.lookup(key, value) if table is not None else None
            if found is None:
                return None
            node, how = found
            if how is How.WILDCARD:
                if node.share_threshold:
                    shared[i] = node.value
                part = value if node.value_to_metric and not node.share_threshold else node.value
            elif how is How.EXACT:
                part = value
            else:
                part = value if node.value_to_metric else ""
            shown.append(f"{key}_{part}" if part else key)
            table = node.children if node.children.items else None
        if node is None or not node.limits:
            return None
        sharing = any(shared)
        if node.detailed_metric:
            shown = [
                f"{k}_{shared[i]}" if shared[i] else (f"{k}_{v}" if v or not sharing else k)
                for i, (k, v) in enumerate(entries)
            ]
        return Match(node, ".".join([domain, *shown]), tuple(shared) if sharing else ())


_DESCRIPTOR_KEYS = frozenset(
    {
        "key",
        "value",
        "rate_limit",
        "rate_limits",
        "descriptors",
        "shadow_mode",
        "quota_mode",
        "detailed_metric",
        "value_to_metric",
        "share_threshold",
        "metadata",
    }
)
_LIMIT_KEYS = frozenset({"unit", "requests_per_unit", "unlimited", "name", "replaces", "algorithm"})


def load_files(paths: Iterable[str | Path], *, merge_domains: bool = False) -> RateLimitConfig:
    """Load every file (one domain each). Domains must be unique across files, unless
    ``merge_domains``: then files of one domain add their top-level descriptors together."""
    return _combine((load_file(path) for path in paths), merge_domains)


def load_texts(texts: Iterable[tuple[str, str]], *, merge_domains: bool = False) -> RateLimitConfig:
    """Like :func:`load_files` from ``(source, text)`` pairs already read (the watcher's case)."""
    return _combine((parse(text, source=source) for source, text in texts), merge_domains)


def _combine(loaded_domains: Iterable[DomainConfig], merge: bool) -> RateLimitConfig:
    domains: dict[str, DomainConfig] = {}
    for loaded in loaded_domains:
        other = domains.get(loaded.domain)
        if other is None:
            domains[loaded.domain] = loaded
        elif merge:
            domains[loaded.domain] = merge_domains(other, loaded)
        else:
            raise ConfigError(
                f"{loaded.source}: domain: duplicate domain {loaded.domain!r} "
                f"(already loaded from {other.source}; set merge_domains to merge them)",
                code="duplicate_domain",
            )
    return RateLimitConfig(domains)


def merge_domains(first: DomainConfig, second: DomainConfig) -> DomainConfig:
    """``second``'s top-level descriptors added to ``first``'s (upstream's MERGE_DOMAIN_CONFIG:
    a composite key defined in both is an error naming ``second``'s file)."""
    seen = {node.composite for node in first.descriptors.items}
    for i, node in enumerate(second.descriptors.items):
        if node.composite in seen:
            raise ConfigError(
                f"{second.source}: descriptors[{i}]: duplicate descriptor composite key "
                f"'{first.domain}.{node.composite}'",
                code="duplicate_descriptor",
            )
        seen.add(node.composite)
    table = DescriptorTable.of((*first.descriptors.items, *second.descriptors.items))
    return DomainConfig(first.domain, first.source, table)


def load_file(path: str | Path) -> DomainConfig:
    path = Path(path)
    try:
        text = _yaml.read_text(path)
    except OSError as exc:
        raise ConfigError(
            f"{path}: cannot read: {exc.strerror or exc}", code="unreadable"
        ) from None
    return parse(text, source=str(path))


def parse(text: str, *, source: str = "<string>") -> DomainConfig:
    """Parse one file's text; ``source`` names it in every error."""
    raw = _scalars.load(text, source=source)  # bounded: aliases, size, depth
    return _Parser(source).domain(raw)


def _shown(value: Any) -> str:
    if isinstance(value, str | int | float | bool) or value is None:
        return repr(value)
    return f"a {type(value).__name__}"


class _Parser:
    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, where: str, message: str, code: str = "invalid_config") -> ConfigError:
        return ConfigError(
            f"{self.source}: {where}: {message}" if where else f"{self.source}: {message}",
            code=code,
        )

    def mapping(self, raw: Any, where: str, allowed: frozenset[str]) -> Mapping[str, Any]:
        if not isinstance(raw, Mapping):
            raise self.fail(where, f"expected a mapping, got {_shown(raw)}")
        for key in raw:
            if not isinstance(key, str):
                raise self.fail(where, f"a key must be a string, got {key!r}", "invalid_type")
            if key not in allowed:
                raise self.fail(where, f"unknown key {key!r}", "unknown_key")
        return raw

    def typed(self, raw: Mapping[str, Any], name: str, where: str, kind: type, default: Any) -> Any:
        value = raw.get(name)
        if value is None:
            return default
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        if not ok:
            raise self.fail(
                f"{where}.{name}" if where else name,
                f"expected {kind.__name__}, got {value!r}",
                "invalid_type",
            )
        return value

    def text(self, raw: Mapping[str, Any], name: str, where: str) -> str:
        """A string field; numbers other than integers are refused as upstream refuses them."""
        value = raw.get(name)
        if value is None:
            return ""
        if isinstance(value, float):
            raise self.fail(
                f"{where}.{name}" if where else name,
                f"expected a string, got the number {value!r} (quote it)",
                "invalid_type",
            )
        if isinstance(value, bool | int):  # only when _scalars could not keep the text
            return str(value).lower() if isinstance(value, bool) else str(value)
        if not isinstance(value, str):
            raise self.fail(
                f"{where}.{name}" if where else name,
                f"expected a string, got {_shown(value)}",
                "invalid_type",
            )
        try:  # a YAML escape can make a lone surrogate, which no protobuf string can carry
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise self.fail(
                f"{where}.{name}" if where else name,
                "not valid Unicode text (a lone surrogate escape?)",
                "invalid_text",
            ) from None
        return value

    def domain(self, raw: Any) -> DomainConfig:
        if raw is None:
            raise self.fail("", "empty file", "missing_domain")
        raw = self.mapping(raw, "", frozenset({"domain", "descriptors"}))
        domain = self.text(raw, "domain", "")
        if not domain:
            raise self.fail(
                "domain", "the domain is required and must not be empty", "missing_domain"
            )
        descriptors = self.typed(raw, "descriptors", "", list, [])
        return DomainConfig(
            domain, self.source, self.table(descriptors or [], "descriptors", domain + ".")
        )

    def table(self, items: list[Any], where: str, parent: str) -> DescriptorTable:
        nodes: list[Descriptor] = []
        seen: set[str] = set()
        for i, item in enumerate(items):
            here = f"{where}[{i}]"
            node = self.descriptor(item, here, parent)
            if node.composite in seen:
                raise self.fail(
                    here,
                    f"duplicate descriptor composite key '{parent}{node.composite}'",
                    "duplicate_descriptor",
                )
            seen.add(node.composite)
            nodes.append(node)
        return DescriptorTable.of(nodes)

    def descriptor(self, raw: Any, where: str, parent: str) -> Descriptor:
        raw = self.mapping(raw, where, _DESCRIPTOR_KEYS)
        key = self.text(raw, "key", where)
        if not key:
            raise self.fail(f"{where}.key", "descriptor has no key", "missing_key")
        if "*" in key:
            raise self.fail(
                f"{where}.key",
                f"a key cannot hold a wildcard ({key!r}); only values can",
                "wildcard_key",
            )
        value = self.text(raw, "value", where)
        flags = {
            name: self.typed(raw, name, where, bool, False)
            for name in (
                "shadow_mode",
                "quota_mode",
                "detailed_metric",
                "value_to_metric",
                "share_threshold",
            )
        }
        if flags["share_threshold"] and "*" not in value:
            shown = f"{key}_{value}" if value else key
            raise self.fail(
                f"{where}.share_threshold",
                f"share_threshold needs a wildcard value (containing '*'), got key '{shown}'",
                "share_without_wildcard",
            )
        limits: list[Limit] = []
        if raw.get("rate_limit") is not None:
            limits.append(self.limit(raw["rate_limit"], f"{where}.rate_limit"))
        extra = self.typed(raw, "rate_limits", where, list, [])
        for i, item in enumerate(extra or []):
            limits.append(self.limit(item, f"{where}.rate_limits[{i}]"))
        if any(lim.unlimited for lim in limits) and len(limits) > 1:
            raise self.fail(
                where,
                "an unlimited rate limit cannot be combined with other limits",
                "unlimited_with_limits",
            )
        windows = [(lim.unit, lim.algorithm) for lim in limits]
        if len(set(windows)) != len(windows):
            raise self.fail(
                where,
                "two limits with the same unit and algorithm (they would share one counter)",
                "duplicate_limit",
            )
        children = self.typed(raw, "descriptors", where, list, [])
        composite = f"{key}_{value}" if value else key
        return Descriptor(
            key=key,
            value=value,
            limits=tuple(limits),
            metadata=self.metadata(raw.get("metadata"), f"{where}.metadata"),
            children=self.table(children or [], f"{where}.descriptors", f"{parent}{composite}."),
            **flags,
        )

    def metadata(self, raw: Any, where: str) -> Mapping[str, Any] | None:
        if raw is None:
            return None
        if not isinstance(raw, Mapping):
            raise self.fail(where, f"expected a mapping, got {_shown(raw)}")
        return self.json_value(raw, where) or None

    def json_value(self, raw: Any, where: str) -> Any:
        """``raw`` as JSON-like data (what a protobuf Struct holds); keys become strings as
        upstream's conversion makes them; dates become their ISO text."""
        if isinstance(raw, Mapping):
            return {str(k): self.json_value(v, f"{where}.{k}") for k, v in raw.items()}
        if isinstance(raw, list):
            return [self.json_value(v, f"{where}[{i}]") for i, v in enumerate(raw)]
        if raw is None or isinstance(raw, str | int | float | bool):
            return raw
        if hasattr(raw, "isoformat"):
            return raw.isoformat()
        raise self.fail(where, f"cannot be metadata: {_shown(raw)}", "invalid_type")

    def limit(self, raw: Any, where: str) -> Limit:
        raw = self.mapping(raw, where, _LIMIT_KEYS)
        unlimited = self.typed(raw, "unlimited", where, bool, False)
        unit = self.text(raw, "unit", where)
        rpu = self.typed(raw, "requests_per_unit", where, int, 0)
        name = self.text(raw, "name", where)
        algorithm_raw = self.typed(raw, "algorithm", where, str, Algorithm.FIXED_WINDOW.value)
        replaces = self.replaces(raw.get("replaces"), f"{where}.replaces", name)
        if unlimited:
            if unit:
                raise self.fail(
                    f"{where}.unit",
                    "an unlimited rate limit must not set a unit",
                    "unlimited_with_unit",
                )
            return Limit(unlimited=True, name=name, replaces=replaces)
        unit = unit.lower()
        if unit not in UNIT_SECONDS:
            raise self.fail(
                f"{where}.unit",
                f"invalid rate limit unit {unit!r} (one of {', '.join(UNIT_SECONDS)})",
                "invalid_unit",
            )
        if rpu < 0 or rpu > 0xFFFFFFFF:
            raise self.fail(
                f"{where}.requests_per_unit",
                f"must be 0..4294967295, got {rpu}",
                "invalid_requests_per_unit",
            )
        try:
            algorithm = Algorithm(algorithm_raw)
        except ValueError:
            raise self.fail(
                f"{where}.algorithm",
                f"unknown algorithm {algorithm_raw!r} "
                f"(one of {', '.join(a.value for a in Algorithm)})",
                "invalid_algorithm",
            ) from None
        return Limit(
            unit=unit, requests_per_unit=rpu, algorithm=algorithm, name=name, replaces=replaces
        )

    def replaces(self, raw: Any, where: str, own_name: str) -> frozenset[str]:
        if raw is None:
            return frozenset()
        if not isinstance(raw, list):
            raise self.fail(where, f"expected a list, got {type(raw).__name__}", "invalid_type")
        names = set()
        for i, item in enumerate(raw):
            item = self.mapping(item, f"{where}[{i}]", frozenset({"name"}))
            name = self.text(item, "name", f"{where}[{i}]")
            if not name:
                raise self.fail(f"{where}[{i}].name", "replaces needs a name", "missing_name")
            if name == own_name:
                raise self.fail(
                    f"{where}[{i}].name",
                    f"a rate limit cannot replace itself ({name!r})",
                    "replaces_self",
                )
            names.add(name)
        return frozenset(names)
