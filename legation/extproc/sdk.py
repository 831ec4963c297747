"""The filter SDK: what a filter plugin implements and what it can do to a request.

A filter is a small class. It declares the phases it needs (:attr:`Filter.phases`; every phase is a
round trip between Envoy and this service, so headers-only is the default) and implements the
matching ``on_*`` hooks. Each hook receives the :class:`~legation.extproc.exchange.Exchange` of the
current HTTP request: the same object for every hook of one request, so ``ex.state`` carries
per-request state from ``on_request_headers`` to ``on_response_headers``.

Hooks may be plain functions or coroutines. A plain function runs on a worker thread, so that one
which blocks (I/O, a lock, a long computation) cannot stall the service's event loop, and the
phase's ``message_timeout`` holds; a filter whose plain hooks never block and are bounded by the
message (the built-ins) sets ``inline = True`` and runs them on the loop with no thread hop. A hook
that is not overridden costs nothing: the chain only calls what a filter defines.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

if TYPE_CHECKING:
    from legation.extproc.exchange import Exchange  # noqa: F401 - named in docstrings


class Phase(enum.Enum):
    """One kind of message Envoy sends on the stream. The value is the ProcessingRequest field."""

    REQUEST_HEADERS = "request_headers"
    REQUEST_BODY = "request_body"
    REQUEST_TRAILERS = "request_trailers"
    RESPONSE_HEADERS = "response_headers"
    RESPONSE_BODY = "response_body"
    RESPONSE_TRAILERS = "response_trailers"

    # members are singletons compared by identity: hash them so too, in C (Enum's own __hash__
    # is a Python call, and phases key the chain's tables on every message)
    __hash__ = object.__hash__

    @property
    def hook(self) -> str:
        return "on_" + self.value


class BodyMode(enum.Enum):
    """How a filter wants a body: all at once (``BUFFERED``) or chunk by chunk (``STREAMED``)."""

    BUFFERED = "BUFFERED"
    STREAMED = "STREAMED"


class Filter:
    """Base class for filters (the :class:`FilterPlugin` protocol with no-op defaults).

    Subclasses set :attr:`name`, :attr:`phases` and, for body phases, :attr:`body_mode`, and
    override the ``on_*`` hooks of the phases they declare. A hook returns ``None`` (or an
    awaitable of it); to stop the request it calls :meth:`Exchange.respond`.
    """

    name: ClassVar[str] = "filter"
    phases: frozenset[Phase] = frozenset({Phase.REQUEST_HEADERS})
    body_mode: BodyMode = BodyMode.BUFFERED
    inline: ClassVar[bool] = False
    """Run plain-function hooks on the event loop instead of a worker thread: only for hooks that
    never block; the deadline is then checked after the hook returns (a late one fails the phase,
    but the loop was held meanwhile)."""
    stateless: ClassVar[bool] = False
    """Every hook reads only the message it is given: nothing from ``ex.state`` or the request
    headers in a response hook. Such a filter's response-headers phase may go over Envoy's
    ext_proc HTTP transport, where each message is a call of its own (a fresh exchange);
    without it a chain with a response phase stays on the gRPC stream."""
    computes: frozenset[str] = frozenset()
    """Request headers (lower case) this filter always sets or removes, whatever the client
    sent: a route that matches on one of them cannot be picked by a client (``legation up``
    leaves such routes out of the curl examples it prints)."""


@runtime_checkable
class FilterPlugin(Protocol):
    """What a filter instance looks like to the chain.

    The hooks are optional: ``on_request_headers``, ``on_request_body``, ``on_request_trailers``,
    ``on_response_headers``, ``on_response_body`` and ``on_response_trailers``, each
    ``(ex: Exchange) -> None | Awaitable[None]``. A hook is called only for a phase listed in
    :attr:`phases` (or a phase turned on for one request by :meth:`Exchange.want_body`).
    """

    name: str
    phases: frozenset[Phase]
    """The phases Envoy must send for this filter; the control plane turns them into the route's
    ``processing_mode``, so a phase not listed here never reaches the service."""

    body_mode: BodyMode
    """For body phases: buffered (default; the whole body, up to Envoy's buffer limit) or
    streamed (chunk by chunk)."""


Hook = Any  # Callable[[Exchange], None | Awaitable[None]]; Any keeps plugin authors' typing simple


@runtime_checkable
class FilterFactory(Protocol):
    """An entry point in group ``legation.extproc.filters`` (see :mod:`legation.plugins`)."""

    name: str

    def validate(self, raw: Mapping[str, Any]) -> Any:
        """Options -> typed, immutable config. Pure; raises ConfigError naming the field."""
        ...

    def create(self, config: Any) -> FilterPlugin:
        """A filter instance, shared by every request on the routes that list it."""
        ...
