"""The RateLimitResponse as the bytes gRPC sends, written without building the message.

Under load, building a response through the protobuf API (a status per descriptor, its limit,
remaining and reset, then serializing) was a third of the rate-limit handler's CPU. A response
is a few varints around parts that repeat: each limit's ``current_limit`` field is serialized
once per plan by protobuf itself (:func:`limit_field`), and what changes per call (the codes,
``limit_remaining``, ``duration_until_reset``) is encoded here. Fields come out in field-number
order, as protobuf writes them; ``tests/ratelimit/test_wire.py`` holds the output to protobuf's
own encoding of the same values. Optional parts (response headers, dynamic metadata) are
serialized by protobuf and appended: concatenated encodings of one message are that message
with the fields of both.
"""

from __future__ import annotations

import functools

from envoy.service.ratelimit.v3 import rls_pb2

from legation._protowire import varint

__all__ = ["bare_status", "limit_field", "overall", "status", "varint"]

_SMALL = tuple(bytes((i,)) for i in range(0x80))
_Status = rls_pb2.RateLimitResponse.DescriptorStatus
_RateLimit = rls_pb2.RateLimitResponse.RateLimit


@functools.lru_cache(maxsize=4096)
def limit_field(name: str, requests_per_unit: int, unit: int) -> bytes:
    """A DescriptorStatus's ``current_limit`` field (number 2, the RateLimit message), encoded
    by protobuf; one shared bytes object per limit (the plans of every request share it)."""
    current = _RateLimit(name=name, requests_per_unit=requests_per_unit, unit=unit)  # type: ignore[arg-type]
    return _Status(current_limit=current).SerializeToString()


def status(code: int, limit: bytes, remaining: int, seconds: int, nanos: int) -> bytes:
    """One ``statuses`` entry of the response (field 2): ``code``, the ``limit`` field from
    :func:`limit_field`, ``limit_remaining`` and ``duration_until_reset`` (always present, as
    the limiter sets it whenever a limit decided)."""
    duration = b""
    if seconds:
        duration = b"\x08" + varint(seconds)
    if nanos:
        duration += b"\x10" + varint(nanos)
    body = b"\x08" + _SMALL[code] + limit
    if remaining:
        body += b"\x18" + varint(remaining)
    body += b"\x22" + _SMALL[len(duration)] + duration  # at most 21 bytes: one length byte
    return b"\x12" + varint(len(body)) + body


def bare_status(code: int, remaining: int = 0) -> bytes:
    """A ``statuses`` entry with no limit: a descriptor nothing limits (``remaining`` 0) or an
    unlimited one (``remaining`` 2^32-1)."""
    body = b"\x08" + _SMALL[code]
    if remaining:
        body += b"\x18" + varint(remaining)
    return b"\x12" + _SMALL[len(body)] + body


def overall(code: int) -> bytes:
    """The response's ``overall_code`` field (number 1)."""
    return b"\x08" + _SMALL[code]
