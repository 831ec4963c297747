"""Decisions in, Envoy out: a policy result -> :class:`Decision` -> ``CheckResponse``.

:func:`decision_from_result` reads the result document exactly as opa-envoy-plugin does: a boolean,
or an object with ``allowed`` and optionally ``headers``, ``response_headers_to_add``,
``request_headers_to_remove``, ``body``, ``http_status`` and ``dynamic_metadata``.

Header names must be RFC 9110 tokens and values free of control characters (CR, LF, NUL...,
see :mod:`legation.extauthz._headers`): a result that breaks this is a policy error, so the
request is denied with the error status (fail closed), never passed on with a header Envoy would
have to refuse. :func:`check_decision` applies the same rule to decisions that Python checks
build themselves; the servicer calls it on every decision before answering.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2
from envoy.type.v3 import http_status_pb2
from google.rpc import code_pb2

from legation.extauthz._headers import bad_header_name, bad_header_value
from legation.extauthz.checks import Decision
from legation.extauthz.errors import AuthzError

_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
_VALID_STATUS = frozenset(http_status_pb2.StatusCode.values()) - {0}


def decision_from_result(result: Any, *, where: str) -> Decision:
    """Turn a policy's result into a Decision; an unusable result is an error (fail closed)."""
    if result is None:
        return Decision(allowed=False, reason=f"{where}: decision undefined")
    if isinstance(result, bool):
        return Decision(allowed=result, reason="" if result else f"{where}: denied")
    if not isinstance(result, Mapping):
        raise AuthzError(f"{where}: result must be a boolean or an object, got "
                         f"{type(result).__name__}", code="invalid_policy_result")
    allowed = result.get("allowed")
    if not isinstance(allowed, bool):
        raise AuthzError(f"{where}: result object needs a boolean 'allowed'",
                         code="invalid_policy_result")
    status = result.get("http_status")
    if status is not None and (isinstance(status, bool) or not isinstance(status, int | float)
                               or int(status) not in _VALID_STATUS):
        raise AuthzError(f"{where}: 'http_status' {status!r} is not an HTTP status Envoy knows",
                         code="invalid_policy_result")
    body = result.get("body", "")
    if not isinstance(body, str):
        raise AuthzError(f"{where}: 'body' must be a string", code="invalid_policy_result")
    remove = result.get("request_headers_to_remove", [])
    if not isinstance(remove, list) or not all(isinstance(h, str) for h in remove):
        raise AuthzError(f"{where}: 'request_headers_to_remove' must be a list of strings",
                         code="invalid_policy_result")
    for name in remove:
        if problem := bad_header_name(name):
            raise AuthzError(f"{where}: 'request_headers_to_remove': {_show(name)} is {problem}",
                             code="invalid_policy_result")
    metadata = result.get("dynamic_metadata", {})
    if not isinstance(metadata, Mapping):
        raise AuthzError(f"{where}: 'dynamic_metadata' must be an object",
                         code="invalid_policy_result")
    return Decision(
        allowed=allowed,
        http_status=int(status) if status is not None else None,
        body=body,
        headers=_headers(result.get("headers", {}), f"{where}: 'headers'"),
        response_headers_to_add=_headers(result.get("response_headers_to_add", {}),
                                         f"{where}: 'response_headers_to_add'"),
        request_headers_to_remove=tuple(remove),
        dynamic_metadata=dict(metadata),
        reason="" if allowed else f"{where}: denied",
    )


def _headers(raw: Any, where: str) -> dict[str, str]:
    """A map of name -> string (or list of strings, joined with ', ' as HTTP allows)."""
    if not isinstance(raw, Mapping):
        raise AuthzError(f"{where} must be an object", code="invalid_policy_result")
    out: dict[str, str] = {}
    for name, value in raw.items():
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            value = ", ".join(value)
        if not isinstance(value, str):
            raise AuthzError(f"{where}: header {_show(name)} must be a string",
                             code="invalid_policy_result")
        if problem := bad_header_name(name) or bad_header_value(value):
            raise AuthzError(f"{where}: header {_show(name)}: {problem}",
                             code="invalid_policy_result")
        out[name] = value
    return out


def check_decision(decision: Decision) -> None:
    """Raise ``invalid_result`` when a decision carries a header Envoy must not get."""
    for field, headers in (("headers", decision.headers),
                           ("response_headers_to_add", decision.response_headers_to_add)):
        for name, value in headers.items():
            if problem := bad_header_name(name) or bad_header_value(value):
                raise AuthzError(f"decision {field}: header {_show(name)}: {problem}",
                                 code="invalid_result")
    for name in decision.request_headers_to_remove:
        if problem := bad_header_name(name):
            raise AuthzError(f"decision request_headers_to_remove: {_show(name)} is {problem}",
                             code="invalid_result")
    if not isinstance(decision.body, str):
        raise AuthzError("decision body: not a string", code="invalid_result")


def _show(name: object) -> str:
    """A header name for a message: bounded, its control characters escaped by repr."""
    return repr(name[:64]) if isinstance(name, str) else type(name).__name__


def _header_options(headers: Mapping[str, str]) -> list[base_pb2.HeaderValueOption]:
    return [
        base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=k, value=v),
                                   append_action=_OVERWRITE)
        for k, v in headers.items()
    ]


def to_check_response(
    decision: Decision, *, decision_id: str, deny_status: int, policy: str | None = None,
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
            ok.headers.extend(_header_options(decision.headers))
        if decision.request_headers_to_remove:
            ok.headers_to_remove.extend(decision.request_headers_to_remove)
        if decision.response_headers_to_add:
            ok.response_headers_to_add.extend(_header_options(decision.response_headers_to_add))
        return response
    response.status.code = code_pb2.PERMISSION_DENIED
    denied = response.denied_response
    denied.status.code = decision.http_status or deny_status  # type: ignore[assignment]
    if decision.headers:
        denied.headers.extend(_header_options(decision.headers))
    denied.body = decision.body
    return response
