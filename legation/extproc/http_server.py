"""ext_proc over Envoy's HTTP transport: one POST per message, answered by the same chains.

Envoy's ext_proc filter configured with ``http_service`` (instead of ``grpc_service``) POSTs each
``ProcessingRequest`` as proto3 JSON to its URI and applies the JSON ``ProcessingResponse`` of a
200 answer; any other answer, or none in time, is a failed call, and the filter's
``failure_mode_allow`` decides (closed by default). Envoy marks ``http_service`` as
work-in-progress (not covered by its threat model), so Legation serves it only when the mesh
opts in (``extproc: {protocol: http}``).

The path names the chain: ``/ext_proc/<chain, percent-encoded>`` (:func:`chain_path`); the
translation gives each chain served this way an ext_proc filter of its own calling that path.
Per POST: the JSON becomes the ``ProcessingRequest`` (:mod:`._json`), and the per-message core
the gRPC servicer uses (:meth:`legation.extproc.processor.Processor.answer`) answers it, with a
fresh :class:`~legation.extproc.exchange.Exchange`: HTTP has no stream, so nothing carries over
from one message to the next. That is why only headers messages are served, and response
headers only for chains whose response hooks are ``stateless`` (the ``headers`` filter): a
chain that needs a body, trailers or the request's state in its response phase stays on gRPC
(:func:`fits_http` is the rule the translation applies).

What goes wrong, and what Envoy sees:

* not ``POST``, a path that names no chain, not ``application/json``, a body that is not a
  ``ProcessingRequest`` (bad JSON, an unknown field, a duplicate key), over the size limit: a 4xx
  error, so the filter's failure mode applies (as a broken gRPC stream would);
* a chain nobody serves, a message with no phase or a phase the chain does not serve over HTTP:
  a 200 carrying an immediate 500 (as the gRPC servicer answers them), whatever the failure mode;
* a filter that raises, outlives the phase deadline, or asks for a body (``want_body``, which
  needs the stream): the chain's failure answer (500, or passed through on a fail-open chain).

The server is :mod:`legation.fastpath._http` (httptools, strict parsing, limits, pipelining),
with mutual TLS as the gRPC services when the mesh's service TLS is on.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, unquote_to_bytes

from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from legation.extproc import _wire
from legation.extproc._json import BadRequest, encode_response, parse_request
from legation.extproc.chain import Chain
from legation.extproc.exchange import Exchange
from legation.extproc.guard import ErrorGuard
from legation.extproc.processor import Processor
from legation.extproc.sdk import Phase
from legation.fastpath import answer
from legation.fastpath._http import Call, Limits, Listening, listen
from legation.grpc_server import ServerTls, TlsSource

__all__ = ["PATH_PREFIX", "HttpSettings", "chain_of", "chain_path", "fits_http", "serve_http"]

log = logging.getLogger("legation.extproc")

PATH_PREFIX = "/ext_proc/"
_PREFIX = PATH_PREFIX.encode()
_BAD_ESCAPE = re.compile(rb"%(?![0-9A-Fa-f]{2})")


def chain_path(name: str) -> str:
    """The path Envoy POSTs chain ``name``'s messages to (every byte but letters, digits and
    ``_.-~`` percent-encoded, so a name never adds a segment, a query or a control character)."""
    return PATH_PREFIX + quote(name, safe="")


def chain_of(target: bytes) -> str | None:
    """The chain a request target names, or None: not exactly ``/ext_proc/`` and one non-empty
    segment of well-formed percent-encoding whose bytes are UTF-8."""
    if not target.startswith(_PREFIX):
        return None
    raw = target[len(_PREFIX) :]
    if not raw or b"/" in raw or b"?" in raw or b"#" in raw or _BAD_ESCAPE.search(raw):
        return None
    try:
        return unquote_to_bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        return None


_HTTP_PHASES = frozenset({Phase.REQUEST_HEADERS, Phase.RESPONSE_HEADERS})


def fits_http(chain: Chain) -> str | None:
    """Why ``chain`` cannot be served over the HTTP transport (None: it can): its filters ask
    for headers only, and every filter with a response-headers hook is ``stateless`` (each
    message is a request of its own: nothing of the request reaches the response's call)."""
    phases = chain.phases
    if not phases:
        return "the chain asks for no phase"
    other = sorted(p.value for p in phases - _HTTP_PHASES)
    if other:
        return (
            f"the chain needs {', '.join(other)}; only headers go over HTTP, where no stream "
            "carries a request's state to later phases"
        )
    stateful = [
        f.name
        for f in chain.filters
        if Phase.RESPONSE_HEADERS in f.phases and not getattr(f, "stateless", False)
    ]
    if stateful:
        return (
            f"filter {stateful[0]} may carry the request's state to its response_headers hook "
            "(it is not declared stateless), which only the gRPC stream can"
        )
    return None


def _serves(chain: Chain, phase: Phase) -> bool:
    """Whether ``phase``'s message of ``chain`` is answered over HTTP: request headers always
    (one call, nothing before it), response headers when the chain fits HTTP."""
    if phase is Phase.REQUEST_HEADERS:
        return True
    return phase is Phase.RESPONSE_HEADERS and phase in chain.phases and fits_http(chain) is None


_LOGGED: dict[str, float] = {}


def _log_limited(code: str, message: str, *args: object) -> None:
    """One line per ``code`` per second at most (whoever reaches the port could otherwise fill
    the log; the metric counts every one). Malformed bodies are logged at all because a newer
    Envoy sending a field this protobuf does not know would fail every call (fail closed)."""
    now = time.monotonic()
    if now - _LOGGED.get(code, -1.0) >= 1.0:
        _LOGGED[code] = now
        log.error(message, *args)


_OK = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "


def _ok(resp: pb.ProcessingResponse, keep_alive: bool) -> bytes:
    body = encode_response(resp)
    close = b"" if keep_alive else b"connection: close\r\n"
    return b"%s%d\r\n%s\r\n%s" % (_OK, len(body), close, body)


def _json_content(headers: Sequence[tuple[bytes, bytes]]) -> bool:
    for name, value in headers:
        if len(name) == 12 and name.lower() == b"content-type":
            return value.split(b";", 1)[0].strip().lower() == b"application/json"
    return False


class ExtProcHttpApp:
    """Call -> answer bytes, around the processor the gRPC servicer uses (a swap applies to
    both from the next message)."""

    cancel_when_closed = True
    """Envoy closes the connection when it stops waiting (its ``message_timeout``): a hook
    still running is cancelled then, as a closed gRPC stream cancels it."""

    def __init__(self, processor: Processor) -> None:
        self.processor = processor

    def __call__(self, call: Call) -> bytes | Coroutine[Any, Any, bytes]:
        keep = call.keep_alive
        metrics = self.processor.metrics
        if call.method != b"POST":
            return answer.error(405, "method_not_allowed", keep_alive=keep)
        name = chain_of(call.target)
        if name is None:
            return answer.error(404, "not_a_chain_path", keep_alive=keep)
        if not _json_content(call.headers):
            return answer.error(415, "not_json", keep_alive=keep)
        try:
            req = parse_request(call.body)
        except BadRequest as err:
            metrics.error("-", "malformed_request")
            _log_limited(
                "malformed_request",
                "ext_proc over HTTP: refused a body that is not a ProcessingRequest: %r",
                str(err)[:300],  # quoted: the parser's text holds the caller's keys verbatim
            )
            return answer.error(400, "malformed_request", keep_alive=keep)
        guard = self.processor.guards.get(name)
        if guard is None:
            metrics.error("-", "unknown_chain")
            _log_limited(
                "unknown_chain",
                "ext_proc over HTTP names unknown chain %r; answering 500",
                name[:100],
            )
            return _ok(self.processor.refuse_unknown(), keep)
        which = req.WhichOneof("request")
        phase = _wire.PHASES.get(which) if which else None
        if which is not None and (phase is None or not _serves(guard.chain, phase)):
            metrics.error("-", "phase_not_over_http")
            _log_limited(
                "phase_not_over_http",
                "chain %r: %s over HTTP (no stream); answering 500",
                guard.chain.name,
                which,
            )
            return _ok(_wire.error_response(500, "legation_phase_not_over_http"), keep)
        phase = phase or Phase.REQUEST_HEADERS  # no phase: answer() refuses it
        run = self._run(guard, req, phase, keep)
        if guard.chain.has_async(phase):
            # its deadline is an asyncio.timeout, which needs a task of its own; inline hooks
            # (the built-ins) are stepped by hand, with no task
            return _awaited(asyncio.get_running_loop().create_task(run))
        return run

    async def _run(
        self, guard: ErrorGuard, req: pb.ProcessingRequest, phase: Phase, keep: bool
    ) -> bytes:
        chain = guard.chain.name
        ex = Exchange(chain)
        # one "stream" per request, as on gRPC: counted with its request headers
        ex._opened = phase is Phase.REQUEST_HEADERS
        ex.buffered.update(guard.buffered)
        resp = await self.processor.answer(guard, ex, req)
        if ex._opened:  # the message did not reach the chain: the stream counted alone
            self.processor.metrics.stream(chain)
        if resp.HasField("mode_override"):
            resp = guard.failed(
                phase,
                ex,
                ex.current_filter or "-",
                "body_over_http",
                "a filter asked for a body, which ext_proc over HTTP cannot carry",
                None,
            )
        return _ok(resp, keep)


async def _awaited(task: asyncio.Task[bytes]) -> bytes:
    return await task


@dataclass(frozen=True, kw_only=True)
class HttpSettings:
    host: str = "127.0.0.1"
    port: int = 0
    reuse_port: bool = False
    limits: Limits = field(default_factory=Limits)
    """A headers message of Envoy's default 60 KiB of headers is ~85 KiB of JSON."""
    tls: ServerTls | TlsSource | None = None
    """None: plaintext; else mutual TLS (:mod:`legation.fastpath._tls`)."""


async def serve_http(processor: Processor, settings: HttpSettings) -> Listening:
    """Serve ``processor``'s chains over HTTP on ``settings``' address (OSError when it cannot
    be bound)."""
    return await listen(
        ExtProcHttpApp(processor),
        host=settings.host,
        port=settings.port,
        limits=settings.limits,
        tls=settings.tls,
        reuse_port=settings.reuse_port,
    )
