"""Header names and values a check may hand to Envoy, checked against RFC 9110.

A name is a ``token`` (section 5.1), optionally after the ``:`` of a pseudo-header; a value holds
no control character but horizontal tab (sections 5.5: ``field-vchar``, ``obs-text``, SP, HTAB).
CR, LF and NUL are the ones that matter (header injection, request smuggling); the others are
refused too because no peer should have to guess what they mean. Both functions return what is
wrong (for the error message), or ``""`` when the name or value is fine.
"""

from __future__ import annotations

import re

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def bad_header_name(name: object) -> str:
    if not isinstance(name, str):
        return "not a string"
    if _TOKEN.fullmatch(name[1:] if name.startswith(":") else name) is None:
        return "not an RFC 9110 token"
    return ""


def bad_header_value(value: object) -> str:
    if not isinstance(value, str):
        return "not a string"
    if _CONTROL.search(value) is not None:
        return "holds a control character"
    return ""
