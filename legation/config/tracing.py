"""Distributed tracing: where every proxy and Legation's services send spans, and how many.

::

    tracing:
      collector: embedded     # (default) Legation's own OTLP receiver, `legation traces` reads it
      # collector: 127.0.0.1:4317   or any OTLP/gRPC collector (Jaeger, the OTel Collector)
      port: 4317              # the embedded receiver's port (only with collector: embedded)
      sampling: 10            # percent of requests traced (default 100), decided at the edge
      max_traces: 1000        # the embedded receiver keeps the newest traces...
      max_spans: 20000        # ...and at most this many spans in all (oldest traces evicted)
      tls: mesh               # the embedded receiver's hop: mesh mTLS (the default when the
                              # mesh's mTLS is on) or none (plaintext, loopback only)

and per route (``routes[].tracing``)::

    tracing: {sampling: 50}   # this route's requests: 50 % instead of the mesh's rate

The proxy that first sees a request (the gateway, or a sidecar for a request from outside the
mesh) decides whether it is traced; the hops after it follow the decision carried in the W3C
``traceparent`` header, so a trace is whole or absent.

``tls`` (only with ``collector: embedded``) works as on the request-path services' blocks
(:mod:`legation.config.extensions`): ``mesh`` (the default when ``mtls.mode`` is permissive or
strict; an error when mTLS is off) makes the receiver serve mutual TLS as
``spiffe://<trust_domain>/ns/<namespace>/sa/legation-tracing`` and accept only certificates from
the mesh CA; every proxy's collector cluster then presents its workload certificate and pins that
id, and Legation's embedded services export with their own service certificate (so an embedded
service with ``tls: none`` is refused while the receiver is on mTLS: it would hold no
certificate to export with). ``none``: plaintext on loopback, anyone on the machine can export.
An external collector is always called in plaintext.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterator
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, Field, field_validator

from legation.config._types import STRICT, Percent, Port
from legation.config.errors import Problem

if TYPE_CHECKING:
    from legation.config.model import Mesh

EMBEDDED = "embedded"
DEFAULT_PORT = 4317
DEFAULT_MAX_TRACES = 1000
DEFAULT_MAX_SPANS = 20_000
_HOST = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?$")


class Tracing(BaseModel):
    model_config = STRICT
    collector: str = EMBEDDED
    port: Port | None = None
    sampling: Percent = 100.0
    max_traces: int | None = Field(default=None, ge=1, le=100_000)
    max_spans: int | None = Field(default=None, ge=1, le=1_000_000)
    tls: Literal["mesh", "none"] | None = None  # None: mesh when embedded and mTLS is on

    @field_validator("collector")
    @classmethod
    def _collector(cls, value: str) -> str:
        if value != EMBEDDED:
            _split(value)
        return value

    @property
    def embedded(self) -> bool:
        return self.collector == EMBEDDED

    def address(self) -> tuple[str, int]:
        """Where spans go: the collector's host and port (the embedded one on loopback)."""
        if self.embedded:
            return "127.0.0.1", self.port or DEFAULT_PORT
        return _split(self.collector)

    def mesh_tls(self, *, mtls_enabled: bool) -> bool:
        """Whether the hop to the embedded receiver is mesh mTLS (see ``tls`` above)."""
        return self.embedded and (self.tls == "mesh" or (self.tls is None and mtls_enabled))

    @property
    def trace_cap(self) -> int:
        return self.max_traces or DEFAULT_MAX_TRACES

    @property
    def span_cap(self) -> int:
        return self.max_spans or DEFAULT_MAX_SPANS


class RouteTracing(BaseModel):
    """A route's own sampling rate (percent), instead of the mesh's ``tracing.sampling``."""

    model_config = STRICT
    sampling: Percent


def _split(value: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` for IPv6), or a ValueError saying what to write."""
    wanted = f"expected 'embedded' or host:port, got {value!r}"
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(wanted)
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise ValueError(wanted) from None
        return host[1:-1], int(port)
    if not _HOST.match(host) or len(host) > 253:
        raise ValueError(wanted)
    return host, int(port)


def tracing_tls(mesh: Mesh) -> bool:
    """Whether ``mesh``'s spans go to the embedded receiver over mesh mTLS."""
    t = mesh.tracing
    return t is not None and t.mesh_tls(mtls_enabled=mesh.mtls.enabled)


def tracing_problems(mesh: Mesh) -> Iterator[Problem]:
    from legation.services import kinds

    t = mesh.tracing
    if t is not None and not t.embedded:
        for key in ("port", "max_traces", "max_spans", "tls"):
            if getattr(t, key) is not None:
                yield Problem(f"tracing.{key}", "only used with collector: embedded")
    if t is not None and t.embedded and t.tls == "mesh" and not mesh.mtls.enabled:
        yield Problem(
            "tracing.tls",
            "'mesh' needs mtls.mode permissive or strict (the certificates come "
            "from the mesh CA); or set tls: none",
        )
    if tracing_tls(mesh):
        for kind, block in kinds.blocks(mesh):
            if (
                kind.traces
                and block.embedded
                and not block.mesh_tls(mtls_enabled=mesh.mtls.enabled)
            ):
                yield Problem(
                    f"{kind.name}.tls",
                    "'none' leaves the service without a mesh certificate to export its "
                    "spans with, and the trace receiver takes mTLS only: set tracing.tls: "
                    "none too, or drop tls: none here",
                )
    for i, r in enumerate(mesh.routes):
        if r.tracing is not None and t is None:
            yield Problem(f"routes[{i}].tracing", "needs a tracing block in the mesh")
