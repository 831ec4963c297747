"""Protobuf's wire format written by hand, for answers sent without building their messages.

The request-path services answer their most common calls with bytes put together from parts
encoded once (``legation.extauthz.response.allow_wire``, ``legation.ratelimit._wire``, the
ext_proc pass-through answers); the varints and length prefixes between those parts, and the
servers' serializer that passes such bytes through, are here.
"""

from __future__ import annotations

from google.protobuf.message import Message

_SMALL = tuple(bytes((i,)) for i in range(0x80))
_MASK64 = (1 << 64) - 1


def varint(n: int) -> bytes:
    """``n`` as a protobuf varint; a negative ``n`` as its 64-bit two's complement (int32 and
    int64 fields are written so)."""
    if 0 <= n < 0x80:
        return _SMALL[n]
    n &= _MASK64
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def delimited(tag: int, payload: bytes) -> bytes:
    """A length-delimited field: its tag byte (field number << 3 | 2), length, ``payload``."""
    return bytes((tag,)) + varint(len(payload)) + payload


def serialize(answer: Message | bytes) -> bytes:
    """A gRPC server's response serializer for handlers that answer either a message or bytes
    already encoded: the bytes as they are."""
    return answer if isinstance(answer, bytes) else answer.SerializeToString()
