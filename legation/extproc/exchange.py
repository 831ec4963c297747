"""One HTTP request as the filters see it, and everything they may do to it.

The servicer creates one :class:`Exchange` per ext_proc stream (one per HTTP request) and hands it
to every hook. What a hook does is recorded and sent back to Envoy in the answer to the current
message (see :mod:`legation.extproc._wire`); mutations are also applied to :attr:`Exchange.headers`
at once, so a later filter in the chain sees what an earlier one did.
"""

from __future__ import annotations

import threading
from typing import Any

from legation.extproc.sdk import BodyMode, Phase

_RESPONSE_SIDE = frozenset({Phase.RESPONSE_HEADERS, Phase.RESPONSE_BODY, Phase.RESPONSE_TRAILERS})

_READING = threading.Lock()  # header maps are read once per exchange: one lock for all

METADATA_NAMESPACE = "legation.extproc"
"""Dynamic metadata set by filters lands in this namespace (the filter's receiving namespace)."""


def read_headers(header_map: Any, into: dict[str, str]) -> None:
    """Fill ``into`` from an ``envoy.config.core.v3.HeaderMap`` (repeated names are joined)."""
    get = into.get
    for h in header_map.headers:
        raw = h.raw_value  # each read of a bytes field makes a new object: read it once
        value = raw.decode("utf-8", "replace") if raw else h.value
        key = h.key
        old = get(key)
        if old is None:
            into[key] = value
        else:
            into[key] = f"{old}; {value}" if key == "cookie" else f"{old},{value}"


class Immediate:
    """An answer sent to the client instead of continuing (403, redirect, 500 from the guard)."""

    __slots__ = ("body", "details", "headers", "status")

    def __init__(self, status: int, body: bytes, headers: dict[str, str], details: str) -> None:
        self.status = status
        self.body = body
        self.headers = headers
        self.details = details


class Exchange:
    """Per-request state and the mutation API of the current phase."""

    __slots__ = (
        "_body",
        "_clear_route_cache",
        "_metadata",
        "_mode",
        "_opened",
        "_removed",
        "_request_headers",
        "_response_headers",
        "_sent",
        "_set",
        "_trailers",
        "body",
        "buffered",
        "chain",
        "current_filter",
        "detached",
        "end_of_stream",
        "immediate",
        "phase",
        "state",
    )

    def __init__(self, chain: str, *, request_headers: dict[str, str] | None = None) -> None:
        """``request_headers``: the request's headers as a dict already read (used as it is,
        changed in place by the hooks)."""
        self.chain = chain
        """The name of the chain (route configuration) this request runs through."""
        self.state: dict[str, Any] = {}
        """Per-request scratch space shared by all hooks of all filters; key it by filter name."""
        self._request_headers = {} if request_headers is None else request_headers
        self._response_headers: dict[str, str] = {}
        self._trailers: dict[str, str] = {}
        # the header maps as Envoy sent them, read into the dicts above on first use: a chain
        # that never looks at headers never pays for reading them
        self._sent: dict[str, Any] | None = None
        self.body: bytes = b""
        """The body (buffered) or the current chunk (streamed) in a body phase."""
        self.end_of_stream = False
        self.phase = Phase.REQUEST_HEADERS
        self.buffered: set[Phase] = set()
        """Body phases Envoy sends whole (buffered); a replaced buffered body gets its
        content-length set in the same answer."""
        self.immediate: Immediate | None = None
        self.current_filter = ""
        """The filter whose hook runs now (for the guard's log line on a timeout)."""
        self.detached = False
        """True while a threaded hook may still be running on this exchange after its deadline:
        the servicer then ends the stream (nothing it does later may reach Envoy)."""
        self._metadata: dict[str, Any] | None = None
        self._mode: dict[str, str] | None = None
        self._opened = False  # a new stream, not yet counted (the guard counts it with its
        # first message, in the same queued update: legation.extproc.metrics.Metrics.recorder)
        self._reset()

    # -- driven by the servicer ---------------------------------------------------------------

    def _reset(self) -> None:
        self._set: list[tuple[str, str, bool]] | None = None
        self._removed: list[str] | None = None
        self._body: bytes | None = None
        self._clear_route_cache = False

    def begin(self, phase: Phase) -> None:
        """Start a new phase: forget the previous phase's mutations (they were sent)."""
        self.phase = phase
        if self._set is not None or self._removed is not None or self._body is not None:
            self._reset()
        self._clear_route_cache = False

    def _received(self, which: str, header_map: Any) -> None:
        """Envoy sent ``header_map`` (an ``envoy.config.core.v3.HeaderMap``) as the request
        headers, response headers or trailers (``which``: ``request``, ``response``,
        ``trailers``); it is read when a hook first looks at any header. Trailers replace
        earlier ones. The map is borrowed: the message holding it must not change while the
        exchange runs (both transports parse a new message per call)."""
        with _READING:
            if which == "trailers":
                self._trailers = {}
            if self._sent is None:
                self._sent = {}
            self._sent[which] = header_map

    def _read_sent(self) -> None:
        """Read the maps not read yet. Under a lock, and ``_sent`` cleared only once the dicts
        are whole: a hook reading from a worker thread while another reads too (or while the
        loop reads for the next message) never sees a dict half read."""
        with _READING:
            sent = self._sent
            if sent is None:
                return
            for which, header_map in sent.items():
                into = (
                    self._request_headers
                    if which == "request"
                    else self._response_headers
                    if which == "response"
                    else self._trailers
                )
                read_headers(header_map, into)
            self._sent = None

    @property
    def request_headers(self) -> dict[str, str]:
        """Request headers (lower-case names, pseudo-headers included), as mutated so far."""
        if self._sent is not None:
            self._read_sent()
        return self._request_headers

    @property
    def response_headers(self) -> dict[str, str]:
        if self._sent is not None:
            self._read_sent()
        return self._response_headers

    @property
    def headers(self) -> dict[str, str]:
        """The headers of the current phase's side: the request headers in the request phases
        (headers, body, trailers), the response headers in the response phases (empty when
        Envoy sent the response body without its headers)."""
        if self._sent is not None:
            self._read_sent()
        if self.phase in _RESPONSE_SIDE:
            return self._response_headers
        return self._request_headers

    @property
    def trailers(self) -> dict[str, str]:
        """The trailers of the current trailers phase."""
        if self._sent is not None:
            self._read_sent()
        return self._trailers

    # -- headers ------------------------------------------------------------------------------

    def set_header(self, name: str, value: str) -> None:
        """Set ``name`` to ``value``, replacing any value it had."""
        name = name.lower()
        self.headers[name] = value
        if self._set is None:
            self._set = []
        self._set.append((name, value, False))

    def add_header(self, name: str, value: str) -> None:
        """Append a value to ``name`` (a second header line if it already exists)."""
        name = name.lower()
        old = self.headers.get(name)
        self.headers[name] = value if old is None else f"{old},{value}"
        if self._set is None:
            self._set = []
        self._set.append((name, value, True))

    def remove_header(self, name: str) -> None:
        name = name.lower()
        if self.headers.pop(name, None) is None:
            return
        if self._removed is None:
            self._removed = []
        self._removed.append(name)
        if self._set:
            self._set = [s for s in self._set if s[0] != name]

    def rename_header(self, old: str, new: str) -> None:
        value = self.headers.get(old.lower())
        if value is not None:
            self.remove_header(old)
            self.set_header(new, value)

    def cookie(self, name: str) -> str | None:
        """The value of cookie ``name`` in the request, or None."""
        raw = self.request_headers.get("cookie")
        if not raw:
            return None
        for part in raw.split(";"):
            key, sep, value = part.strip().partition("=")
            if sep and key == name:
                return value
        return None

    # -- body, routing, metadata --------------------------------------------------------------

    def replace_body(self, data: bytes) -> None:
        """Replace the body (buffered mode) or the current chunk (streamed mode)."""
        self.body = data
        self._body = data

    def clear_route_cache(self) -> None:
        """Make Envoy pick the route again after this phase (headers changed what should match)."""
        self._clear_route_cache = True

    def set_metadata(self, key: str, value: Any) -> None:
        """Emit ``key: value`` as Envoy dynamic metadata in namespace ``legation.extproc``."""
        if self._metadata is None:
            self._metadata = {}
        self._metadata[key] = value

    def want_body(self, phase: Phase, mode: BodyMode = BodyMode.BUFFERED) -> None:
        """Ask Envoy to send a body it would not send on this route (``mode_override``).

        Only honoured in a headers phase: request body from ``on_request_headers``, response body
        from ``on_request_headers`` or ``on_response_headers``.
        """
        if phase not in (Phase.REQUEST_BODY, Phase.RESPONSE_BODY):
            raise ValueError(f"want_body: {phase.value} is not a body phase")
        if self._mode is None:
            self._mode = {}
        self._mode[f"{phase.value}_mode"] = mode.value
        if mode is BodyMode.BUFFERED:
            self.buffered.add(phase)
        else:
            self.buffered.discard(phase)

    # -- answering at once --------------------------------------------------------------------

    def respond(
        self,
        status: int,
        body: bytes | str = b"",
        *,
        headers: dict[str, str] | None = None,
        details: str = "",
    ) -> None:
        """Answer the client now with ``status``; the rest of the chain and the upstream are
        skipped."""
        if isinstance(body, str):
            body = body.encode()
        self.immediate = Immediate(status, body, dict(headers or {}), details)

    def redirect(self, location: str, status: int = 302) -> None:
        self.respond(status, headers={"location": location}, details="legation_redirect")
