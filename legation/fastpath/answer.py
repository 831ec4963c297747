"""A :class:`~legation.extauthz.checks.Decision` -> the HTTP answer Envoy's ext_authz applies.

Envoy reads an HTTP-mode answer by its status: 200 allows, anything else denies with that status,
the body and the headers. So:

* allowed: ``200``, the decision's upstream ``headers`` (a name's values joined with ``,``, as
  Envoy joins them on the gRPC path), ``request_headers_to_remove`` in
  ``x-envoy-auth-headers-to-remove``, ``response_headers_to_add`` one line per value;
* denied: the decision's status (never 200: that would allow), its headers one line per value
  (two Set-Cookie stay two), its body.

:func:`validator` refuses, before the answer is built, what HTTP mode cannot carry or Envoy would
not pass on: an upstream header outside :class:`~legation.fastpath.contract.Forwarded`, a
response header outside the filter's ``client_headers``, query-parameter mutations, a framing or
Envoy control header, a denial with status 200. The servicer then denies with ``error_status``
(fail closed), as it does for any other unusable decision. Dynamic metadata is not carried.
Header names and values were checked by the servicer already (no CR/LF/NUL reaches here).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from http import HTTPStatus

from legation.extauthz.checks import Decision, header_items
from legation.extauthz.errors import AuthzError
from legation.fastpath.contract import REMOVE_HEADER, Forwarded

# Names a decision must not set over HTTP: they frame the answer or steer Envoy.
_RESERVED = frozenset(
    {
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "te",
        "trailer",
        "upgrade",
        "proxy-connection",
        "host",
        REMOVE_HEADER,
        "x-envoy-auth-partial-body",
    }
)


def _unsupported(message: str) -> AuthzError:
    return AuthzError(message, code="not_in_http_mode")


def validator(
    forwarded: Forwarded, client_headers: Iterable[str] = ()
) -> Callable[[Decision], None]:
    """The check the servicer runs on each decision for the HTTP call-out (see module doc)."""
    client = frozenset(n.lower() for n in client_headers)

    def validate(decision: Decision) -> None:
        if (
            decision.allowed
            and not decision.headers
            and not decision.response_headers_to_add
            and not decision.query_parameters_to_set
            and not decision.query_parameters_to_remove
        ):  # a plain allow (the hot path): nothing below can refuse it
            return
        for name, _ in header_items(decision.headers):
            key = name.lower()
            if key in _RESERVED or key.startswith(":"):
                raise _unsupported(f"decision header {name[:64]!r} is reserved over HTTP")
            if decision.allowed and key not in forwarded:
                raise _unsupported(
                    f"upstream header {name[:64]!r} is not one the filter "
                    f"forwards (x-legation-* or upstream_headers)"
                )
        for name, _ in header_items(decision.response_headers_to_add):
            key = name.lower()
            if key in _RESERVED or key not in client or key in forwarded:
                raise _unsupported(
                    f"response header {name[:64]!r} is not one the filter "
                    f"passes to the client (client_headers)"
                )
        if decision.query_parameters_to_set or decision.query_parameters_to_remove:
            raise _unsupported("query parameter mutations need the gRPC call-out")
        if not decision.allowed and decision.http_status == 200:
            raise _unsupported("a denial cannot answer 200 over HTTP (Envoy would allow)")

    return validate


def _status_line(status: int) -> bytes:
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Status"
    return f"HTTP/1.1 {status} {phrase}\r\n".encode()


_ALLOW = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n"
_CLOSE = b"connection: close\r\n"
_PLAIN_ALLOW = {True: _ALLOW + b"\r\n", False: _ALLOW + _CLOSE + b"\r\n"}  # by keep_alive


def encode(decision: Decision, *, deny_status: int, keep_alive: bool = True) -> bytes:
    """The answer's bytes. ``deny_status`` is used when a denial names none."""
    if (
        decision.allowed
        and not decision.headers
        and not decision.request_headers_to_remove
        and not decision.response_headers_to_add
    ):  # a plain allow (the hot path): what the rest would join
        return _PLAIN_ALLOW[bool(keep_alive)]
    lines: list[str] = []
    if decision.allowed:
        head = _ALLOW
        joined: dict[str, list[str]] = {}
        for name, value in header_items(decision.headers):
            joined.setdefault(name.lower(), []).append(value)
        lines.extend(f"{name}: {','.join(values)}\r\n" for name, values in joined.items())
        if decision.request_headers_to_remove:
            lines.append(f"{REMOVE_HEADER}: {','.join(decision.request_headers_to_remove)}\r\n")
        lines.extend(
            f"{name}: {value}\r\n" for name, value in header_items(decision.response_headers_to_add)
        )
        body = b""
    else:
        status = decision.http_status or deny_status
        if status == 200:  # refused by the validator; a config could still say so: never allow
            status = 403
        body = decision.body.encode()
        head = _status_line(status) + f"content-length: {len(body)}\r\n".encode()
        lines.extend(f"{name}: {value}\r\n" for name, value in header_items(decision.headers))
    return b"".join(
        (head, *(line.encode() for line in lines), b"" if keep_alive else _CLOSE, b"\r\n", body)
    )


def error(status: int, code: str, *, keep_alive: bool = False) -> bytes:
    """A denial the server makes itself (a malformed call), never an allow."""
    body = f'{{"error":"{code}"}}'.encode()
    return b"".join(
        (
            _status_line(status),
            b"content-type: application/json\r\n",
            f"content-length: {len(body)}\r\n".encode(),
            b"" if keep_alive else _CLOSE,
            b"\r\n",
            body,
        )
    )
