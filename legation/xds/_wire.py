"""Protobuf wire encoding of the few envelope fields the ADS server assembles by hand.

Resources are encoded once per version (see snapshot.py); responses are built by concatenating
those bytes with the per-response fields encoded here, which is what makes a push to N streams cost
N concatenations rather than N serialisations.
"""

from __future__ import annotations


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def bytes_field(number: int, value: bytes) -> bytes:
    """A length-delimited field (wire type 2)."""
    return varint(number << 3 | 2) + varint(len(value)) + value


def str_field(number: int, value: str) -> bytes:
    return bytes_field(number, value.encode()) if value else b""


def any_message(type_url: str, data: bytes) -> bytes:
    """google.protobuf.Any{type_url=1, value=2}."""
    return str_field(1, type_url) + bytes_field(2, data)


def any_field(number: int, type_url: str, data: bytes) -> bytes:
    return bytes_field(number, any_message(type_url, data))


def delta_resource_field(name: str, version: str, type_url: str, data: bytes) -> bytes:
    """DeltaDiscoveryResponse.resources (field 2) holding
    discovery.v3.Resource{version=1, resource=2, name=3}."""
    body = str_field(1, version) + any_field(2, type_url, data) + str_field(3, name)
    return bytes_field(2, body)


def discovery_response(
    *, version: str, type_url: str, nonce: str, resource_fields: list[bytes]
) -> bytes:
    """DiscoveryResponse{version_info=1, resources=2, type_url=4, nonce=5}."""
    return b"".join(
        [str_field(1, version), *resource_fields, str_field(4, type_url), str_field(5, nonce)]
    )


def delta_discovery_response(
    *,
    system_version: str,
    type_url: str,
    nonce: str,
    resource_fields: list[bytes],
    removed: list[str],
) -> bytes:
    """DeltaDiscoveryResponse{system_version_info=1, resources=2, type_url=4, nonce=5,
    removed_resources=6}."""
    return b"".join(
        [
            str_field(1, system_version),
            *resource_fields,
            str_field(4, type_url),
            str_field(5, nonce),
            *(bytes_field(6, name.encode()) for name in removed),
        ]
    )
