"""Decisions in, Envoy out: a policy result -> :class:`Decision` -> ``CheckResponse``.

:func:`decision_from_result` reads the result document as opa-envoy-plugin does: a boolean, or an
object with a boolean ``allowed`` and optionally

* ``headers`` (to the upstream when allowed, to the client when denied) and
  ``response_headers_to_add`` (to the client, allowed only): an object of name -> string or list
  of strings, or a list of such objects; every value is its own header entry (two Set-Cookie);
* ``request_headers_to_remove``, ``query_parameters_to_remove``: lists of strings (allowed only);
* ``query_parameters_to_set``: an object of key -> string or list of strings (allowed only);
* ``body`` (a string) and ``http_status`` (an HTTP status Envoy knows) for a denial;
* ``dynamic_metadata``: an object.

A field of the wrong type is a policy error. Unlike opa-envoy-plugin, which reads only the fields
of the branch taken (a denial's ``query_parameters_to_set`` is never looked at), every field is
checked whichever the branch: a malformed result fails closed even where it would not matter.
Header names must be RFC 9110 tokens and values free of control characters (CR, LF,
NUL..., see :mod:`legation.extauthz._headers`), as must query parameters: a result that breaks
this is a policy error too, so the request is denied with the error status (fail closed), never
passed on with a header Envoy would have to refuse. :func:`check_decision` applies the same rules
to decisions that Python checks build themselves; the servicer calls it on every decision.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2
from envoy.type.v3 import http_status_pb2
from google.rpc import code_pb2

from legation._protowire import delimited, varint
from legation.extauthz._headers import bad_header_name, bad_header_value
from legation.extauthz.checks import Decision, Headers, header_items
from legation.extauthz.errors import AuthzError

_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
_APPEND = base_pb2.HeaderValueOption.APPEND_IF_EXISTS_OR_ADD
_VALID_STATUS = frozenset(http_status_pb2.StatusCode.values()) - {0}


def _invalid(message: str) -> AuthzError:
    return AuthzError(message, code="invalid_policy_result")


def decision_from_result(result: Any, *, where: str) -> Decision:
    """Turn a policy's result into a Decision; an unusable result is an error (fail closed)."""
    if result is None:
        return Decision(allowed=False, reason=f"{where}: decision undefined")
    if isinstance(result, bool):
        return Decision(allowed=result, reason="" if result else f"{where}: denied")
    if not isinstance(result, Mapping):
        raise _invalid(f"{where}: result must be a boolean or an object, got {_type(result)}")
    if "allowed" not in result:
        raise _invalid(f"{where}: result object has no 'allowed' key")
    allowed = result["allowed"]
    if not isinstance(allowed, bool):
        raise _invalid(f"{where}: 'allowed' must be a boolean, got {_type(allowed)}")
    headers = _headers(result.get("headers", {}), f"{where}: 'headers'")
    metadata = result.get("dynamic_metadata", {})
    if not isinstance(metadata, Mapping):
        raise _invalid(f"{where}: 'dynamic_metadata' must be an object, got {_type(metadata)}")
    body = result.get("body", "")
    if not isinstance(body, str):
        raise _invalid(f"{where}: 'body' must be a string, got {_type(body)}")
    status = _status(result, where)
    response_headers = _headers(
        result.get("response_headers_to_add", {}), f"{where}: 'response_headers_to_add'"
    )
    remove = _strings(result, "request_headers_to_remove", where)
    for name in remove:
        if problem := bad_header_name(name):
            raise _invalid(f"{where}: 'request_headers_to_remove': {_show(name)} is {problem}")
    query_remove = _strings(result, "query_parameters_to_remove", where)
    for key in query_remove:
        if problem := bad_header_value(key):
            raise _invalid(f"{where}: 'query_parameters_to_remove': {_show(key)} {problem}")
    query_set = _query_set(result.get("query_parameters_to_set", {}), where)
    if not allowed:
        return Decision(
            allowed=False,
            http_status=status,
            body=body,
            headers=headers,
            dynamic_metadata=dict(metadata),
            reason=f"{where}: denied",
        )
    return Decision(
        allowed=True,
        headers=headers,
        response_headers_to_add=response_headers,
        request_headers_to_remove=remove,
        query_parameters_to_set=query_set,
        query_parameters_to_remove=query_remove,
        dynamic_metadata=dict(metadata),
    )


def _type(value: Any) -> str:
    """A result value's type in Rego's words."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def _status(result: Mapping[str, Any], where: str) -> int | None:
    if "http_status" not in result:
        return None
    status = result["http_status"]
    if isinstance(status, bool) or not isinstance(status, int):
        raise _invalid(f"{where}: 'http_status' must be an integer, got {_type(status)}")
    if status not in _VALID_STATUS:
        raise _invalid(f"{where}: 'http_status' {status} is not an HTTP status Envoy knows")
    return status


def _strings(result: Mapping[str, Any], key: str, where: str) -> tuple[str, ...]:
    raw = result.get(key, [])
    if not isinstance(raw, list) or not all(isinstance(v, str) for v in raw):
        raise _invalid(f"{where}: '{key}' must be a list of strings, got {_type(raw)}")
    return tuple(raw)


def _values(value: Any, what: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    raise _invalid(f"{what} must be a string or a list of strings, got {_type(value)}")


def _headers(raw: Any, where: str) -> Headers:
    """An object (or list of objects) of name -> string or list of strings, as (name, value)
    pairs; a plain mapping when every name is given once."""
    objects = raw if isinstance(raw, list) else [raw]
    pairs: list[tuple[str, str]] = []
    for obj in objects:
        if not isinstance(obj, Mapping):
            raise _invalid(f"{where} must be an object or a list of objects, got {_type(obj)}")
        for name, value in obj.items():
            for v in _values(value, f"{where}: header {_show(name)}"):
                if problem := bad_header_name(name) or bad_header_value(v):
                    raise _invalid(f"{where}: header {_show(name)}: {problem}")
                pairs.append((name, v))
    if len({name for name, _ in pairs}) == len(pairs):
        return dict(pairs)
    return tuple(pairs)


def _query_set(raw: Any, where: str) -> tuple[tuple[str, str], ...]:
    if not isinstance(raw, Mapping):
        raise _invalid(f"{where}: 'query_parameters_to_set' must be an object, got {_type(raw)}")
    out: list[tuple[str, str]] = []
    for key, value in raw.items():
        for v in _values(value, f"{where}: 'query_parameters_to_set' {_show(key)}"):
            if problem := bad_header_value(key) or bad_header_value(v):
                raise _invalid(f"{where}: 'query_parameters_to_set' {_show(key)}: {problem}")
            out.append((key, v))
    return tuple(out)


def check_decision(decision: Decision) -> None:
    """Raise ``invalid_result`` when a decision carries a header or query parameter Envoy must
    not get."""
    if not (
        decision.headers
        or decision.response_headers_to_add
        or decision.request_headers_to_remove
        or decision.query_parameters_to_set
        or decision.query_parameters_to_remove
    ):  # the common plain allow or deny: nothing to walk (the hot path)
        if not isinstance(decision.body, str):
            raise AuthzError("decision body: not a string", code="invalid_result")
        return
    for field, headers in (
        ("headers", decision.headers),
        ("response_headers_to_add", decision.response_headers_to_add),
    ):
        for name, value in header_items(headers):
            if problem := bad_header_name(name) or bad_header_value(value):
                raise AuthzError(
                    f"decision {field}: header {_show(name)}: {problem}", code="invalid_result"
                )
    for name in decision.request_headers_to_remove:
        if problem := bad_header_name(name):
            raise AuthzError(
                f"decision request_headers_to_remove: {_show(name)} is {problem}",
                code="invalid_result",
            )
    for key, value in (
        *decision.query_parameters_to_set,
        *((k, "") for k in decision.query_parameters_to_remove),
    ):
        if problem := bad_header_value(key) or bad_header_value(value):
            raise AuthzError(
                f"decision query parameter {_show(key)}: {problem}", code="invalid_result"
            )
    if not isinstance(decision.body, str):
        raise AuthzError("decision body: not a string", code="invalid_result")


def _show(name: object) -> str:
    """A header name for a message: bounded, its control characters escaped by repr."""
    return repr(name[:64]) if isinstance(name, str) else type(name).__name__


def _header_options(
    headers: Headers,
    *,
    append: bool = False,
    legacy: bool = False,
) -> list[base_pb2.HeaderValueOption]:
    """One option per value. Without ``append``, a name's first value replaces what the message
    already has under that name (a client-sent ``x-user`` never survives next to the policy's)
    and its further values are appended to it; with ``append``, every value is appended.
    ``legacy`` also sets the deprecated ``append`` flag on appended values: Envoy 1.40's
    ext_authz reads only that flag for the request headers of an OkHttpResponse (it then joins
    the values with a comma)."""
    out = []
    seen: set[str] = set()
    for name, value in header_items(headers):
        key = name.lower()
        action = _APPEND if append or key in seen else _OVERWRITE
        seen.add(key)
        option = base_pb2.HeaderValueOption(
            header=base_pb2.HeaderValue(key=name, value=value), append_action=action
        )
        if action == _APPEND and legacy:
            option.append.value = True  # Envoy's ext_authz reads only this for request headers
        out.append(option)
    return out


def _query_parameters(pairs: Iterable[tuple[str, str]]) -> list[base_pb2.QueryParameter]:
    return [base_pb2.QueryParameter(key=k, value=v) for k, v in pairs]


def plain_allow(decision: Decision) -> bool:
    """Whether ``decision`` allows with nothing to change and no metadata of its own (most
    answers): :func:`allow_wire` can encode it."""
    return decision.allowed and not (
        decision.headers
        or decision.dynamic_metadata
        or decision.request_headers_to_remove
        or decision.response_headers_to_add
        or decision.query_parameters_to_set
        or decision.query_parameters_to_remove
    )


def _string_field(key: str, value: str) -> bytes:
    """One ``Struct.fields`` map entry (field 1) holding ``Value{string_value}`` (field 3)."""
    value_msg = delimited(0x1A, value.encode())
    return delimited(0x0A, delimited(0x0A, key.encode()) + delimited(0x12, value_msg))


# CheckResponse: status (1) = {} (code OK), then dynamic_metadata (4); no ok_response, as
# to_check_response leaves it unset for a plain allow
_ALLOW_HEAD = b"\x0a\x00"
_ID_LENGTH = 32  # new_decision_id's hex digits: one framing for every id
_ID_FRAMING = _string_field("decision_id", "0" * _ID_LENGTH)[:-_ID_LENGTH]
_heads: dict[str, bytes] = {}


def allow_wire(policy: str, decision_id: str) -> bytes:
    """The serialized CheckResponse of a :func:`plain_allow` decision: what
    ``to_check_response(decision, decision_id=..., policy=...)`` serializes to, without the
    per-call protobuf objects (about 5 us under load). Everything but the id is kept per
    policy (a bounded set: routes name them)."""
    if len(decision_id) != _ID_LENGTH or not decision_id.isascii():
        metadata = _string_field("policy", policy) + _string_field("decision_id", decision_id)
        return _ALLOW_HEAD + b"\x22" + varint(len(metadata)) + metadata
    head = _heads.get(policy)
    if head is None:
        field = _string_field("policy", policy)
        length = len(field) + len(_ID_FRAMING) + _ID_LENGTH
        head = _ALLOW_HEAD + b"\x22" + varint(length) + field + _ID_FRAMING
        if len(_heads) < 1024:
            _heads[policy] = head
    return head + decision_id.encode()


def to_check_response(
    decision: Decision,
    *,
    decision_id: str,
    deny_status: int,
    policy: str | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> external_auth_pb2.CheckResponse:
    """The CheckResponse Envoy applies; the decision id always travels in dynamic metadata
    (after ``policy``, ``metadata`` and the decision's own metadata, which override in turn)."""
    response = external_auth_pb2.CheckResponse()
    meta = response.dynamic_metadata
    if policy is not None:
        meta.fields["policy"].string_value = policy
    if metadata:
        meta.update(metadata)
    if decision.dynamic_metadata:
        meta.update(decision.dynamic_metadata)
    meta.fields["decision_id"].string_value = decision_id
    if decision.allowed:
        response.status.code = code_pb2.OK
        ok = response.ok_response
        if decision.headers:
            ok.headers.extend(_header_options(decision.headers, legacy=True))
        if decision.request_headers_to_remove:
            ok.headers_to_remove.extend(decision.request_headers_to_remove)
        if decision.response_headers_to_add:
            ok.response_headers_to_add.extend(
                _header_options(decision.response_headers_to_add, append=True)
            )
        if decision.query_parameters_to_set:
            ok.query_parameters_to_set.extend(_query_parameters(decision.query_parameters_to_set))
        if decision.query_parameters_to_remove:
            ok.query_parameters_to_remove.extend(decision.query_parameters_to_remove)
        return response
    response.status.code = code_pb2.PERMISSION_DENIED
    denied = response.denied_response
    denied.status.code = decision.http_status or deny_status  # type: ignore[assignment]
    if decision.headers:
        denied.headers.extend(_header_options(decision.headers))
    denied.body = decision.body
    return response
