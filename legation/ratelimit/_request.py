"""What the limiter reads from a request and adds to a response, apart from deciding: the
request's descriptors as plain values (the key its plan is kept under), one descriptor after
matching, the optional response headers' names, and upstream's response dynamic metadata."""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from envoy.service.ratelimit.v3 import rls_pb2
from google.protobuf import text_format

from legation.ratelimit.algorithms import Hit
from legation.ratelimit.config import Limit, Match
from legation.ratelimit.errors import RateLimitError


@dataclass(frozen=True, slots=True, kw_only=True)
class ResponseHeaders:
    """Names of the headers added to the response (upstream's defaults)."""

    limit: str = "RateLimit-Limit"
    remaining: str = "RateLimit-Remaining"
    reset: str = "RateLimit-Reset"


@dataclass(frozen=True, slots=True)
class _Checked:
    """One request descriptor after matching: its limits still in force, their counter keys and
    near-limit thresholds, and the modes that decide what an over-limit status means."""

    match: Match | None
    metric_key: str
    limits: tuple[Limit, ...]
    keys: tuple[str, ...]
    near: tuple[int, ...]
    cost: int
    shadow: bool
    quota: bool
    unlimited: bool
    metadata: Mapping[str, Any] | None


def _f32(x: float) -> float:
    return float(struct.unpack("f", struct.pack("f", x))[0])


# one descriptor as sent: entries, cost, the override's (unit, requests_per_unit) or None
_Shape = tuple[tuple[tuple[tuple[str, str], ...], int, tuple[int, int] | None], ...]
_Plan = tuple[tuple[_Checked, ...], tuple[Hit, ...]]


def _shape(request: rls_pb2.RateLimitRequest) -> _Shape:
    """The request's descriptors as plain values; raises on a malformed request."""
    domain = request.domain
    if not domain:
        raise RateLimitError("rate limit domain must not be empty", code="invalid_request")
    if not request.descriptors:
        raise RateLimitError("rate limit descriptor list must not be empty", code="invalid_request")
    default_cost = request.hits_addend or 1
    shape = []
    for d in request.descriptors:
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
