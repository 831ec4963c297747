"""Protobuf in and out: Envoy's header maps to dicts, an Exchange's record to ProcessingResponse."""

from __future__ import annotations

from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2, wrappers_pb2

from legation.extproc.exchange import METADATA_NAMESPACE, Exchange, Immediate
from legation.extproc.sdk import Phase

_APPEND = base_pb2.HeaderValueOption.APPEND_IF_EXISTS_OR_ADD
_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
_TRUE = wrappers_pb2.BoolValue(value=True)
_FALSE = wrappers_pb2.BoolValue(value=False)
_BODY_MODES = processing_mode_pb2.ProcessingMode.BodySendMode

PHASES = {phase.value: phase for phase in Phase}


def _header_mutation(ex: Exchange) -> pb.HeaderMutation | None:
    if ex._set is None and ex._removed is None:
        return None
    mutation = pb.HeaderMutation()
    for name, value, append in ex._set or ():
        # Envoy's ext_proc reads the deprecated ``append`` flag, not ``append_action``
        # (envoyproxy/envoy#36982); both are set so either reading gets it right.
        mutation.set_headers.append(
            base_pb2.HeaderValueOption(
                header=base_pb2.HeaderValue(key=name, raw_value=value.encode()),
                append=_TRUE if append else _FALSE,
                append_action=_APPEND if append else _OVERWRITE,
            )
        )
    if ex._removed:
        mutation.remove_headers.extend(ex._removed)
    return mutation


def _common(ex: Exchange) -> pb.CommonResponse | None:
    mutation = _header_mutation(ex)
    if mutation is None and ex._body is None and not ex._clear_route_cache:
        return None
    common = pb.CommonResponse()
    if mutation is not None:
        common.header_mutation.CopyFrom(mutation)
    if ex._body is not None:
        common.body_mutation.body = ex._body
    if ex._clear_route_cache:
        common.clear_route_cache = True
    return common


def immediate_response(imm: Immediate) -> pb.ProcessingResponse:
    resp = pb.ProcessingResponse()
    out = resp.immediate_response
    out.status.code = imm.status  # type: ignore[assignment]
    out.body = imm.body
    out.details = imm.details
    for name, value in imm.headers.items():
        out.headers.set_headers.append(
            base_pb2.HeaderValueOption(
                header=base_pb2.HeaderValue(key=name, raw_value=value.encode()),
                append_action=_OVERWRITE,
            )
        )
    return resp


def error_response(status: int, details: str) -> pb.ProcessingResponse:
    """The guard's answer: a plain-text error with no internals in the body."""
    body = f"{http_status_pb2.StatusCode.Name(status) if status in _KNOWN else status}\n"
    return immediate_response(
        Immediate(status, body.encode(), {"content-type": "text/plain"}, details)
    )


_KNOWN = set(http_status_pb2.StatusCode.values())


def response(
    phase: Phase, ex: Exchange, base_mode: processing_mode_pb2.ProcessingMode
) -> pb.ProcessingResponse:
    """The answer to the current message, from what the hooks recorded on ``ex``.

    A body asked for with :meth:`Exchange.want_body` becomes a ``mode_override``: the route's own
    mode (``base_mode``) with that body turned on, so the other phases stay as the route says.
    """
    if ex.immediate is not None:
        return immediate_response(ex.immediate)
    if (
        ex._set is None
        and ex._removed is None
        and ex._body is None
        and not ex._clear_route_cache
        and not ex._metadata
        and not ex._mode
    ):  # the hooks recorded nothing (the common answer): what built() would build
        return passthrough(phase)
    return built(phase, ex, base_mode)


def built(
    phase: Phase, ex: Exchange, base_mode: processing_mode_pb2.ProcessingMode
) -> pb.ProcessingResponse:
    """:func:`response` for an exchange whose hooks recorded something (no immediate answer)."""
    resp = pb.ProcessingResponse()
    if ex._body is not None and phase in ex.buffered:
        # The headers are still held in buffered mode: keep the length true to the new body.
        ex.set_header("content-length", str(len(ex._body)))
    common = _common(ex)
    if phase is Phase.REQUEST_HEADERS:
        part = resp.request_headers
    elif phase is Phase.RESPONSE_HEADERS:
        part = resp.response_headers
    elif phase is Phase.REQUEST_BODY:
        part = resp.request_body
    elif phase is Phase.RESPONSE_BODY:
        part = resp.response_body
    else:
        is_request = phase is Phase.REQUEST_TRAILERS
        trailers = resp.request_trailers if is_request else resp.response_trailers
        mutation = _header_mutation(ex)
        if mutation is not None:
            trailers.header_mutation.CopyFrom(mutation)
        else:
            trailers.SetInParent()
        common = None
        part = None
    if part is not None:
        if common is not None:
            part.response.CopyFrom(common)
        else:
            part.SetInParent()
    if ex._metadata:
        resp.dynamic_metadata.CopyFrom(_struct({METADATA_NAMESPACE: ex._metadata}))
        ex._metadata = None
    if ex._mode:
        resp.mode_override.CopyFrom(base_mode)
        for field, mode in ex._mode.items():
            setattr(resp.mode_override, field, _BODY_MODES.Value(mode))
        ex._mode = None
    return resp


def passthrough(phase: Phase) -> pb.ProcessingResponse:
    """Continue unchanged (also the fail-open answer): one shared message per phase, never to
    be changed (:data:`WIRE` holds its bytes)."""
    return _PASSTHROUGH[phase]


def _passthrough(phase: Phase) -> pb.ProcessingResponse:
    resp = pb.ProcessingResponse()
    getattr(resp, phase.value).SetInParent()
    return resp


_PASSTHROUGH = {phase: _passthrough(phase) for phase in Phase}
WIRE = {id(resp): resp.SerializeToString() for resp in _PASSTHROUGH.values()}
"""The shared answers' bytes, by the answer's ``id``: the gRPC servicer writes these instead of
having each serialized again (the server's serializer, ``legation._protowire.serialize``,
passes them as they are)."""


def _struct(value: dict[str, Any]) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(value)
    return s
