"""OTLP/gRPC on the wire: the TraceService method, and OTLP spans to and from the store's.

The OTLP messages are xds-protos' ``opentelemetry.proto`` (the package ships the messages but no
gRPC stubs), so the method is called and served by its path with generic handlers. Those
messages are an older OTLP whose ``instrumentation_library_spans`` (field 2) is today's
``scope_spans`` on the wire (same number, same layout), so what Envoy and current SDKs send
parses; fields added since (``Span.flags``) are carried as unknown fields and ignored.

What the embedded receiver keeps of a URL attribute (Envoy's ``http.url``) is its part before
the query string: a token passed as a query parameter is never stored (an external collector
gets what Envoy sends).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.resource.v1 import resource_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from legation.tracing.store import MAX_ATTRIBUTES, MAX_NAME, Scalar, Span, clip

__all__ = ["EXPORT_METHOD", "SERVICE", "from_request", "service_names", "to_request"]

SERVICE = "opentelemetry.proto.collector.trace.v1.TraceService"
EXPORT_METHOD = f"/{SERVICE}/Export"

_KINDS = {
    trace_pb2.Span.SPAN_KIND_INTERNAL: "internal",
    trace_pb2.Span.SPAN_KIND_SERVER: "server",
    trace_pb2.Span.SPAN_KIND_CLIENT: "client",
    trace_pb2.Span.SPAN_KIND_PRODUCER: "producer",
    trace_pb2.Span.SPAN_KIND_CONSUMER: "consumer",
}
_KIND_CODES = {v: k for k, v in _KINDS.items()}
_STATUS = {trace_pb2.Status.STATUS_CODE_OK: "ok", trace_pb2.Status.STATUS_CODE_ERROR: "error"}
_STATUS_CODES = {v: k for k, v in _STATUS.items()}
_URL_KEYS = frozenset({"http.url", "url.full"})


def from_request(request: trace_service_pb2.ExportTraceServiceRequest) -> Iterator[Span]:
    """The spans of an Export request; spans without a 16-byte trace id and 8-byte span id are
    skipped (the W3C sizes; anything else cannot be joined to a trace)."""
    for rs in request.resource_spans:
        service = clip(_string_attr(rs.resource.attributes, "service.name") or "?", MAX_NAME)
        for ss in rs.instrumentation_library_spans:  # scope_spans on the wire
            for s in ss.spans:
                if len(s.trace_id) != 16 or len(s.span_id) != 8:
                    continue
                yield Span(
                    trace_id=s.trace_id.hex(),
                    span_id=s.span_id.hex(),
                    parent_id=s.parent_span_id.hex() if len(s.parent_span_id) == 8 else "",
                    name=clip(s.name, MAX_NAME),
                    service=service,
                    kind=_KINDS.get(s.kind, "unspecified"),
                    start_ns=s.start_time_unix_nano,
                    end_ns=max(s.end_time_unix_nano, s.start_time_unix_nano),
                    status=_STATUS.get(s.status.code, ""),
                    attributes=_attributes(s.attributes),
                )


def service_names(request: trace_service_pb2.ExportTraceServiceRequest) -> set[str]:
    """The ``service.name`` of each resource in an Export request, as :func:`from_request`
    stores it ("?" for none)."""
    return {
        clip(_string_attr(rs.resource.attributes, "service.name") or "?", MAX_NAME)
        for rs in request.resource_spans
    }


def _string_attr(attrs: Iterable[common_pb2.KeyValue], key: str) -> str | None:
    for kv in attrs:
        if kv.key == key and kv.value.WhichOneof("value") == "string_value":
            return str(kv.value.string_value)
    return None


def _attributes(attrs: Iterable[common_pb2.KeyValue]) -> dict[str, Scalar]:
    out: dict[str, Scalar] = {}
    for kv in attrs:
        if len(out) >= MAX_ATTRIBUTES:
            break
        which = kv.value.WhichOneof("value")
        value: Scalar
        if which == "string_value":
            value = clip(kv.value.string_value)
            if kv.key in _URL_KEYS:  # Envoy tags the whole URL: a query may carry a token
                value = value.split("?", 1)[0]
        elif which == "bool_value":
            value = kv.value.bool_value
        elif which == "int_value":
            value = kv.value.int_value
        elif which == "double_value":
            value = kv.value.double_value
        else:
            continue  # arrays, maps and bytes: not shown by `legation traces`
        out[clip(kv.key, MAX_NAME)] = value
    return out


def to_request(
    spans: Iterable[Span], *, service: str
) -> trace_service_pb2.ExportTraceServiceRequest:
    """An Export request carrying ``spans`` of one ``service`` (one resource, one scope)."""
    scope = trace_pb2.InstrumentationLibrarySpans(
        instrumentation_library=common_pb2.InstrumentationLibrary(name="legation")
    )
    for s in spans:
        out = scope.spans.add(
            trace_id=bytes.fromhex(s.trace_id),
            span_id=bytes.fromhex(s.span_id),
            parent_span_id=bytes.fromhex(s.parent_id) if s.parent_id else b"",
            name=s.name,
            kind=_KIND_CODES.get(s.kind, trace_pb2.Span.SPAN_KIND_UNSPECIFIED),
            start_time_unix_nano=s.start_ns,
            end_time_unix_nano=s.end_ns,
        )
        if s.status:
            out.status.code = _STATUS_CODES[s.status]
        for key, value in s.attributes.items():
            out.attributes.append(common_pb2.KeyValue(key=key, value=_any(value)))
    resource = resource_pb2.Resource(
        attributes=[common_pb2.KeyValue(key="service.name", value=_any(service))]
    )
    return trace_service_pb2.ExportTraceServiceRequest(
        resource_spans=[
            trace_pb2.ResourceSpans(resource=resource, instrumentation_library_spans=[scope])
        ]
    )


def _any(value: Scalar) -> common_pb2.AnyValue:
    if isinstance(value, bool):
        return common_pb2.AnyValue(bool_value=value)
    if isinstance(value, int):
        return common_pb2.AnyValue(int_value=value)
    if isinstance(value, float):
        return common_pb2.AnyValue(double_value=value)
    return common_pb2.AnyValue(string_value=str(value))
