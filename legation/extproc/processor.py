"""The core both ext_proc transports call: the served chains, and one message -> one answer.

:class:`Processor` holds the chains (each behind its :class:`~legation.extproc.guard.ErrorGuard`)
and swaps them in place on a reload. :meth:`Processor.answer` turns one ``ProcessingRequest`` of
a request's :class:`~legation.extproc.exchange.Exchange` into its ``ProcessingResponse``: the
phase it carries, its headers, body or trailers read into the exchange, the chain's guard run.
The gRPC servicer (:mod:`.servicer`) calls it once per message of a stream; the HTTP transport
(:mod:`.http_server`) once per POST, with a fresh exchange each time. A message that carries no
phase, or a chain nobody serves, gets the same well-formed 500 answer on both.
"""

from __future__ import annotations

from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from legation.extproc import _wire
from legation.extproc.config import Chains
from legation.extproc.exchange import Exchange
from legation.extproc.guard import ErrorGuard
from legation.extproc.metrics import Metrics
from legation.extproc.sdk import Phase

__all__ = ["HEADER_PHASES", "Processor"]

HEADER_PHASES = frozenset({Phase.REQUEST_HEADERS, Phase.RESPONSE_HEADERS})
_BODIES = frozenset({Phase.REQUEST_BODY, Phase.RESPONSE_BODY})


class Processor:
    """The served chains by name (``swap`` replaces them), and the per-message core."""

    def __init__(self, chains: Chains, *, metrics: Metrics, message_timeout: float) -> None:
        self.metrics = metrics
        self.swap(chains, message_timeout=message_timeout)

    def swap(self, chains: Chains, *, message_timeout: float) -> None:
        """Serve ``chains`` from the next request on (an exchange already running keeps the
        guard it started with)."""
        if message_timeout <= 0:
            raise ValueError("ext_proc timeouts must be positive")
        self.guards = {
            name: ErrorGuard(chain, metrics=self.metrics, message_timeout=message_timeout)
            for name, chain in chains.chains.items()
        }
        self.default = chains.default

    def guard(self, name: str | None) -> ErrorGuard | None:
        """The guard of chain ``name`` (empty or None: the default chain), or None."""
        if not name:
            name = self.default
        return self.guards.get(name) if name else None

    def refuse_unknown(self) -> pb.ProcessingResponse:
        """The answer for a chain nobody serves: a 500, counted under ``-`` (the name comes from
        the caller, so it never becomes a metric label)."""
        self.metrics.answered("-", 500)
        return _wire.error_response(500, "legation_unknown_chain")

    async def answer(
        self, guard: ErrorGuard, ex: Exchange, req: pb.ProcessingRequest
    ) -> pb.ProcessingResponse:
        """One message of ``ex``'s request through ``guard``'s chain: its answer, always
        well-formed (a message with no phase: a 500). ``req``'s header maps are borrowed, read
        when a hook first looks (:meth:`Exchange._received`): ``req`` must not be changed
        while ``ex`` runs."""
        which = req.WhichOneof("request")
        phase = _wire.PHASES.get(which) if which else None
        if phase is None:
            self.metrics.error("-", "malformed_request")
            return _wire.error_response(500, "legation_malformed_request")
        ex.begin(phase)
        msg = getattr(req, which)
        if phase in HEADER_PHASES:
            ex._received("request" if phase is Phase.REQUEST_HEADERS else "response", msg.headers)
            ex.end_of_stream = msg.end_of_stream
        elif phase in _BODIES:
            ex.body = msg.body
            ex.end_of_stream = msg.end_of_stream
        else:
            ex._received("trailers", msg.trailers)
        return await guard(phase, ex)
