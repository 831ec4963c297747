"""Legation's services in a request's trace: one span per check, per ext_proc stream, per
rate-limit decision, a child of the Envoy span that made the call.

Envoy, when it traces a request, starts a client span for each call-out and sends its context in
the W3C ``traceparent`` header: in the gRPC call's metadata (ext_authz, ext_proc, rate limit) or
among the HTTP call-out's request headers. A service asks :meth:`CallTracer.parent` for it and,
when the request is sampled, records its span with :meth:`CallTracer.record` after the work is
done (start and end given), through the OpenTelemetry SDK (a batch processor exporting on its own
thread to the mesh's collector, :class:`~legation.tracing.exporter.OtlpExporter`).

The cost stays off the request path when nothing is traced: with tracing off, ``parent`` is one
attribute test; for an unsampled request it is a string check of ``traceparent`` (no SDK object
is made). Only sampled requests reach the SDK.

Attributes are an allow-list (:data:`ATTRIBUTES`): decisions, policy and limit names, codes,
filter names, never a header value, a token, a cookie or a descriptor's value (a descriptor may
be built from any header, ``authorization`` too). A key outside the list is dropped.

:func:`configure` follows the mesh's ``tracing`` block (called by whoever applies a mesh to the
services: the embedded runner, or a service process following its plan). When the embedded
receiver is on mesh mTLS it also gets ``tls_for(kind)``: each service's own certificate, which
its exporter presents (:class:`~legation.tracing.exporter.OtlpExporter`). The SDK provider and
its exporter thread are made on the first sampled span, so each worker process of a service
(``--workers``, forked) has its own. The batch processor holds at most 2,048 spans: past that
(a collector away, or more sampled spans than it exports) the SDK drops spans rather than grow.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode

from legation.certs.spiffe import TRACING, service_name
from legation.tracing.exporter import OtlpExporter
from legation.tracing.store import Scalar, clip

if TYPE_CHECKING:
    from collections.abc import Callable

    from legation.config.tracing import Tracing
    from legation.grpc_server import ServerTls

    TlsFor = Callable[[str], ServerTls | None]

__all__ = ["ATTRIBUTES", "CallTracer", "SpanContext", "configure", "parse_traceparent"]

ATTRIBUTES = frozenset(
    {
        "legation.decision",  # allow / deny / error / would_deny; OK / OVER_LIMIT
        "legation.policy",  # the ext_authz policy (package) name
        "legation.checks",  # the checks run, by name
        "legation.code",  # the stable error code of a denial or failure
        "legation.transport",  # grpc / http (the ext_authz call-out)
        "legation.domain",  # the rate-limit domain
        "legation.descriptors",  # descriptor keys only (values may be anything a header held)
        "legation.limit",  # the matched limit, e.g. "3/minute"
        "legation.chain",  # the ext_proc chain (named after its route)
        "legation.filters",  # the chain's filter names
        "legation.messages",  # ext_proc messages handled on the stream
    }
)
_SCHEDULE_DELAY_MS = 1000
_TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}")
_SAMPLED = frozenset("13579bdf")  # the flags' last hex digit with the sampled bit set


def parse_traceparent(value: str | None) -> SpanContext | None:
    """The parent in a W3C ``traceparent`` (version 00, lower-case hex) when it is well formed
    and sampled; None otherwise (absent, malformed, unsampled, all-zero ids). An unsampled one
    costs a length test and one character lookup."""
    if value is None or len(value) != 55 or value[54] not in _SAMPLED:
        return None
    m = _TRACEPARENT.fullmatch(value)
    if m is None:
        return None
    trace_id, span_id = int(m.group(1), 16), int(m.group(2), 16)
    if not trace_id or not span_id:
        return None
    return SpanContext(trace_id, span_id, is_remote=True, trace_flags=trace.TraceFlags(1))


class _Export:
    """The process's export target and one SDK provider per Legation service name."""

    def __init__(self) -> None:
        self.address: tuple[str, int] | None = None
        self.tls_for: TlsFor | None = None
        self._providers: dict[str, TracerProvider] = {}
        self._tracers: dict[str, trace.Tracer] = {}
        self._lock = threading.Lock()

    def set(self, address: tuple[str, int] | None, tls_for: TlsFor | None = None) -> None:
        with self._lock:
            same = (address, tls_for is None) == (self.address, self.tls_for is None)
            self.tls_for = tls_for  # the exporters ask through it: a new source needs no restart
            if same:
                return
            old, self._providers, self._tracers = self._providers, {}, {}
            self.address = address
        for provider in old.values():  # flushes what is queued to the old collector
            threading.Thread(target=provider.shutdown, daemon=True).start()

    def tracer(self, service: str) -> trace.Tracer | None:
        tracer = self._tracers.get(service)
        if tracer is not None:
            return tracer
        with self._lock:
            if self.address is None:
                return None
            provider = self._providers.get(service)
            if provider is None:
                name = service_name(service)
                provider = TracerProvider(resource=Resource({"service.name": name}))
                exporter = OtlpExporter(
                    *self.address,
                    service=name,
                    tls=None if self.tls_for is None else lambda: self._tls(service),
                    server_name=service_name(TRACING),
                )
                provider.add_span_processor(
                    BatchSpanProcessor(exporter, schedule_delay_millis=_SCHEDULE_DELAY_MS)
                )
                self._providers[service] = provider
            tracer = self._tracers[service] = provider.get_tracer("legation")
            return tracer

    def _tls(self, service: str) -> ServerTls | None:
        tls_for = self.tls_for
        return tls_for(service) if tls_for is not None else None


_EXPORT = _Export()


def configure(tracing: Tracing | None, tls_for: TlsFor | None = None) -> None:
    """Send spans to ``tracing``'s collector from now on; None turns the spans off.
    ``tls_for(kind)``: the certificate service ``kind`` exports with over mTLS (None:
    plaintext)."""
    _EXPORT.set(tracing.address() if tracing is not None else None, tls_for)


class CallTracer:
    """The spans of one Legation service (``extauthz``, ``extproc``, ``ratelimit``)."""

    def __init__(self, service: str) -> None:
        self.service = service

    @property
    def on(self) -> bool:
        return _EXPORT.address is not None

    def parent(self, traceparent: str | None) -> SpanContext | None:
        """The sampled Envoy span ``traceparent`` names, or None (no span to record)."""
        if _EXPORT.address is None:
            return None
        return parse_traceparent(traceparent)

    def parent_in(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> SpanContext | None:
        """:meth:`parent` of the ``traceparent`` in gRPC invocation metadata."""
        if _EXPORT.address is None or metadata is None:
            return None
        for key, value in metadata:
            if key == "traceparent" and isinstance(value, str):
                return parse_traceparent(value)
        return None

    def record(
        self,
        name: str,
        parent: SpanContext,
        *,
        start_ns: int,
        end_ns: int,
        attributes: Mapping[str, Scalar | None],
        error: bool = False,
    ) -> None:
        """A finished server span ``name`` under ``parent``; attributes outside
        :data:`ATTRIBUTES` and None values are dropped, strings clipped (a policy name comes
        from the route's context extensions, which a caller of the port chooses)."""
        tracer = _EXPORT.tracer(self.service)
        if tracer is None:
            return
        kept = {
            k: clip(v) if isinstance(v, str) else v
            for k, v in attributes.items()
            if k in ATTRIBUTES and v is not None
        }
        span = tracer.start_span(
            name,
            context=trace.set_span_in_context(NonRecordingSpan(parent)),
            kind=SpanKind.SERVER,
            attributes=kept,
            start_time=start_ns,
        )
        if error:
            span.set_status(Status(StatusCode.ERROR))
        span.end(end_time=max(end_ns, start_ns))
