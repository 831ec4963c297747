"""What the limiter reads from a request and adds to a response, apart from deciding: the
request's descriptors as plain values (the key its plan is kept under), one descriptor after
matching, the optional response headers' names, and upstream's response dynamic metadata."""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from envoy.service.ratelimit.v3 import rls_pb2
from envoy.type.v3 import ratelimit_unit_pb2
from google.protobuf import text_format
from google.protobuf.message import DecodeError

from legation.ratelimit._wire import limit_field
from legation.ratelimit.algorithms import Hit
from legation.ratelimit.config import Limit, Match, RateLimitConfig
from legation.ratelimit.errors import RateLimitError


@dataclass(frozen=True, slots=True, kw_only=True)
class ResponseHeaders:
    """Names of the headers added to the response (upstream's defaults)."""

    limit: str = "RateLimit-Limit"
    remaining: str = "RateLimit-Remaining"
    reset: str = "RateLimit-Reset"


@dataclass(frozen=True, slots=True)
class _Checked:
    """One request descriptor after matching: its limits still in force, each one's
    ``current_limit`` field as the response carries it (:func:`._wire.limit_field`), their
    counter keys and near-limit thresholds, and the modes that decide what an over-limit status
    means."""

    match: Match | None
    metric_key: str
    limits: tuple[Limit, ...]
    fields: tuple[bytes, ...]
    keys: tuple[str, ...]
    near: tuple[int, ...]
    cost: int
    shadow: bool
    quota: bool
    unlimited: bool
    metadata: Mapping[str, Any] | None


def _f32(x: float) -> float:
    return float(struct.unpack("f", struct.pack("f", x))[0])


@dataclass(frozen=True, slots=True)
class _Plan:
    """A request matched against one config: its domain, its descriptors checked, the hits to
    count (in the order of ``checked``, each descriptor's limits in turn)."""

    domain: str
    checked: tuple[_Checked, ...]
    hits: tuple[Hit, ...]
    fast: _Fast | None = None


@dataclass(frozen=True, slots=True)
class _Fast:
    """What the limiter's fast path needs of a plan of one descriptor under one fixed-window
    limit (the shape of nearly every Envoy rate limit): the counter's stored key, the window,
    the limit, the cost, the near-limit threshold, the status's ``current_limit`` field, and the
    descriptor's allowed and near-limit counters."""

    key: str
    window_ms: int
    requests_per_unit: int
    cost: int
    near_at: int
    field: bytes
    allowed: Callable[[float], None]
    near: Callable[[float], None]


# one descriptor as sent: entries, cost, the override's (unit, requests_per_unit) or None
_Shape = tuple[tuple[tuple[tuple[str, str], ...], int, tuple[int, int] | None], ...]


MAX_DESCRIPTORS = 256
"""Descriptors one request may carry (Envoy sends one per matching rate-limit action of the
route: a handful). Matching runs on the service's event loop, a few ms per 100 descriptors: a
request of gRPC's 4 MiB of them would stall every other call for seconds."""
MAX_ENTRIES = 64
"""Entries one descriptor may carry (one per action of the descriptor's rate limit)."""


def parse_request(raw: bytes) -> rls_pb2.RateLimitRequest:
    """``raw`` parsed; raises :class:`RateLimitError` ``invalid_request`` when it is not a
    well-formed RateLimitRequest (bad wire format, a string that is not UTF-8)."""
    try:
        return rls_pb2.RateLimitRequest.FromString(raw)
    except DecodeError:
        raise RateLimitError("malformed RateLimitRequest", code="invalid_request") from None


def _shape(request: rls_pb2.RateLimitRequest) -> _Shape:
    """The request's descriptors as plain values; raises on a malformed request."""
    domain = request.domain
    if not domain:
        raise RateLimitError("rate limit domain must not be empty", code="invalid_request")
    if not request.descriptors:
        raise RateLimitError("rate limit descriptor list must not be empty", code="invalid_request")
    if len(request.descriptors) > MAX_DESCRIPTORS:
        raise RateLimitError(
            f"{len(request.descriptors)} descriptors in one request, more than {MAX_DESCRIPTORS}",
            code="invalid_request",
        )
    default_cost = request.hits_addend or 1
    shape = []
    for i, d in enumerate(request.descriptors):
        if len(d.entries) > MAX_ENTRIES:
            raise RateLimitError(
                f"descriptors[{i}]: {len(d.entries)} entries, more than {MAX_ENTRIES}",
                code="invalid_request",
            )
        entries = tuple((e.key, e.value) for e in d.entries)
        cost = d.hits_addend.value if d.HasField("hits_addend") else default_cost
        override = (d.limit.unit, d.limit.requests_per_unit) if d.HasField("limit") else None
        shape.append((entries, cost, override))
    return tuple(shape)


def _metadata(request: rls_pb2.RateLimitRequest, passed: Sequence[_Checked]) -> dict[str, Any]:
    """Upstream's response dynamic metadata: domain, descriptors (entries as ``k=v``, override,
    hits_addend), the request's hits_addend, and the metadata of the descriptors that passed,
    merged (the first value of a key wins; nested mappings merge)."""
    descriptors = []
    for d in request.descriptors:
        item: dict[str, Any] = {"entries": [f"{e.key}={e.value}" for e in d.entries]}
        if d.HasField("limit"):
            item["limit"] = text_format.MessageToString(d.limit, as_one_line=True)
        if d.HasField("hits_addend"):
            item["hitsAddend"] = d.hits_addend.value
        descriptors.append(item)
    out: dict[str, Any] = {"domain": request.domain, "descriptors": descriptors}
    if request.hits_addend:
        out["hitsAddend"] = request.hits_addend
    merged: dict[str, Any] = {}
    for c in passed:
        if c.metadata:
            _merge_first_wins(merged, c.metadata)
    if merged:
        out["metadata"] = merged
    return out


def _merge_first_wins(dest: dict[str, Any], src: Mapping[str, Any]) -> None:
    for key, value in src.items():
        if key not in dest:
            dest[key] = _copy(value)
        elif isinstance(dest[key], dict) and isinstance(value, Mapping):
            _merge_first_wins(dest[key], value)


def _copy(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


_OVERRIDE_UNIT = {v: name.lower() for name, v in ratelimit_unit_pb2.RateLimitUnit.items()}
_UNIT = {name.lower(): v for name, v in rls_pb2.RateLimitResponse.RateLimit.Unit.items()}
_ESCAPE = str.maketrans({"%": "%25", "|": "%7C", "=": "%3D"})


def match_descriptors(
    config: RateLimitConfig,
    domain: str,
    shape: _Shape,
    *,
    near: Callable[[int], int],
    quota_mode: bool,
) -> tuple[_Checked, ...]:
    """Each request descriptor matched against ``config`` (or its own limit override, in a
    configured domain), with the limits ``replaces`` leaves in force, their counter keys and
    near-limit thresholds (``near``), as envoyproxy/ratelimit matches them."""
    known = domain in config.domains  # overrides apply in configured domains only
    found: list[tuple[tuple[tuple[str, str], ...], Match | None, int, Limit | None]] = []
    replaced: set[str] = set()
    for entries, cost, raw_override in shape:
        override = match = None
        if raw_override is not None:
            if known:
                unit = _OVERRIDE_UNIT.get(raw_override[0], "unknown")
                if unit == "unknown":
                    raise RateLimitError(
                        f"domain {domain!r}: descriptor limit override has no unit",
                        code="invalid_request",
                    )
                override = Limit(unit=unit, requests_per_unit=raw_override[1])
        else:
            match = config.match(domain, entries)
            if match is not None:
                for limit in match.limits:
                    replaced |= limit.replaces
        found.append((entries, match, cost, override))
    out = []
    for entries, match, cost, override in found:
        shared = match.shared if match is not None else ()
        values = (
            [shared[i] or v for i, (_, v) in enumerate(entries)]
            if shared
            else [v for _, v in entries]
        )
        base = (
            domain
            + "|"
            + "|".join(
                f"{k.translate(_ESCAPE)}={v.translate(_ESCAPE)}"
                for (k, _), v in zip(entries, values, strict=True)
            )
        )
        node = match.descriptor if match is not None else None
        limits: tuple[Limit, ...] = ()
        if override is not None:
            limits = (override,)
            metric_key = ".".join([domain, *(f"{k}_{v}" if v else k for k, v in entries)])
        elif match is not None:
            limits = tuple(
                lim
                for lim in match.limits
                if not (lim.name and lim.name in replaced) and not lim.unlimited
            )
            metric_key = match.metric_key
        else:
            metric_key = ".".join([domain, *(k for k, _ in entries)])
        out.append(
            _Checked(
                match=match,
                metric_key=metric_key,
                limits=limits,
                fields=tuple(
                    limit_field(lim.name, lim.requests_per_unit, _UNIT[lim.unit]) for lim in limits
                ),
                keys=tuple(f"{base}|{lim.algorithm.value}:{lim.unit}" for lim in limits),
                near=tuple(near(lim.requests_per_unit) for lim in limits),
                cost=cost,
                shadow=node is not None and node.shadow_mode,
                quota=quota_mode or (node is not None and node.quota_mode),
                unlimited=node is not None and any(lim.unlimited for lim in node.limits),
                metadata=node.metadata if node is not None else None,
            )
        )
    return tuple(out)
