"""The two regopy calls on the request path, straight to its C API.

``regopy.Input`` walks a value with ABC ``isinstance`` checks and a ``create_string_buffer`` per
string, and ``Output`` parses the result JSON into objects we never use (then we parsed it again).
Here: one type dispatch per node, ``bytes`` passed as ``char*``, and the result JSON parsed once.
Same library, same entry points, same semantics.
"""

from __future__ import annotations

from typing import Any

from regopy import Bundle, Interpreter, RegoError
from regopy.rego_shared import rego as _lib  # the loaded librego_shared, argtypes already set
from regopy.rego_shared import rego_get_error, rego_output_string

_new_input = _lib.regoNewInput
_free_input = _lib.regoFreeInput
_set_input = _lib.regoSetInput
_str = _lib.regoInputString
_int = _lib.regoInputInt
_float = _lib.regoInputFloat
_bool = _lib.regoInputBoolean
_null = _lib.regoInputNull
_item = _lib.regoInputObjectItem
_object = _lib.regoInputObject
_array = _lib.regoInputArray
_query = _lib.regoBundleQueryEntrypoint
_output_ok = _lib.regoOutputOk
_free_output = _lib.regoFreeOutput

_INT64 = 1 << 63


def _add(p: int, value: Any) -> int:
    """Push ``value`` onto the input builder; returns the sum of the C status codes (0 = ok)."""
    t = type(value)
    if t is str:
        return int(_str(p, value.encode()))
    if t is dict:
        rc = 0
        for k, v in value.items():
            rc += _str(p, str(k).encode()) + _add(p, v) + _item(p)
        return rc + int(_object(p, len(value)))
    if t is list or t is tuple:
        rc = 0
        for v in value:
            rc += _add(p, v)
        return rc + int(_array(p, len(value)))
    if t is bool:
        return int(_bool(p, value))
    if t is int:
        return int(_int(p, value) if -_INT64 <= value < _INT64 else _float(p, float(value)))
    if t is float:
        return int(_float(p, value))
    if value is None:
        return int(_null(p))
    raise TypeError(f"cannot hand a {t.__name__} to the policy engine")


def set_input(interp: Interpreter, document: dict[str, Any]) -> None:
    p = _new_input()
    try:
        if _add(p, document) != 0:
            raise RegoError("cannot build the policy input")
        if _set_input(interp._impl, p) != 0:
            raise RegoError(rego_get_error(interp._impl))
    finally:
        _free_input(p)


def query(interp: Interpreter, bundle: Bundle, entrypoint: bytes) -> tuple[bool, str]:
    """(ok, text): the result JSON (``{"expressions":[...]}`` or ``undefined``) when ok, else
    the engine's error text."""
    out = _query(interp._impl, bundle._impl, entrypoint)
    if not out:
        raise RegoError(rego_get_error(interp._impl))
    try:
        return bool(_output_ok(out)), rego_output_string(out)
    finally:
        _free_output(out)
