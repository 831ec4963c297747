"""Malformed or hostile HTTP to the fast-path server: a clean 4xx and a closed connection, or
answers in order; never an allow, never a crash; no CR/LF from a decision reaches an answer."""

from __future__ import annotations

import pytest

from legation.fastpath import envoy_filter as ef
from legation.fastpath.server import CalloutServer
from tests.fastpath.cases import Case, http_call, parse_answer
from tests.fastpath.conftest import exchange

pytestmark = pytest.mark.either_loop  # on asyncio's loop and on uvloop, as served

GET = b"GET /legation/check/allow HTTP/1.1\r\nhost: a\r\nx-legation-policy: fast.test\r\n"


def answers(raw: bytes) -> list[int]:
    """The statuses of the answers in ``raw``, in order."""
    out = []
    while raw:
        head, _, rest = raw.partition(b"\r\n\r\n")
        length = next(
            (
                int(line.split(b":")[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            ),
            0,
        )
        out.append(parse_answer(head + b"\r\n\r\n" + rest[:length])[0])
        raw = rest[length:]
    return out


async def still_serves(server: CalloutServer) -> None:
    raw = await exchange(
        server.port, http_call(Case("ok", "/allow", headers={"x-tenant": "t"})), wait=0.5
    )
    assert answers(raw) == [200]


BAD = {
    "two different Content-Length": GET + b"content-length: 1\r\ncontent-length: 2\r\n\r\nab",
    "Content-Length and Transfer-Encoding": GET + b"content-length: 3\r\n"
    b"transfer-encoding: chunked\r\n\r\n0\r\n\r\n",
    "bad chunk size": GET.replace(b"GET", b"POST") + b"transfer-encoding: chunked\r\n\r\n"
    b"zz\r\nabc\r\n0\r\n\r\n",
    "CR in a header value": GET + b"x-tenant: a\rb\r\n\r\n",
    "LF alone ending a header": GET + b"x-tenant: a\nx-user: b\r\n\r\n",
    "space before the colon": GET + b"x-tenant : a\r\n\r\n",
    "obsolete line folding": GET + b"x-tenant: a\r\n b\r\n\r\n",
    "not HTTP": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40,
    "bad request line": b"GET /legation/check/allow HTTP/9.9\r\nhost: a\r\n\r\n",
    "upgrade": GET + b"connection: upgrade\r\nupgrade: websocket\r\n\r\n",
}


@pytest.mark.parametrize("raw", BAD.values(), ids=BAD.keys())
async def test_malformed_requests_get_400_and_close(server: CalloutServer, raw: bytes) -> None:
    got = await exchange(server.port, raw)
    assert got, "the server closed without an answer"
    assert answers(got)[0] == 400 and 200 not in answers(got)
    await still_serves(server)


async def test_oversized_head_431(server: CalloutServer) -> None:
    got = await exchange(server.port, GET + b"x-tenant: " + b"a" * 70_000 + b"\r\n\r\n")
    assert answers(got) == [431]
    many = b"".join(b"x-h%d: 1\r\n" % i for i in range(150))
    assert answers(await exchange(server.port, GET + many + b"\r\n")) == [431]
    await still_serves(server)


async def test_oversized_body_413(server: CalloutServer) -> None:
    raw = GET.replace(b"GET", b"POST") + b"content-length: 2000000\r\n\r\n" + b"a" * 1_100_000
    assert answers(await exchange(server.port, raw)) == [413]
    await still_serves(server)


async def test_pipelined_requests_answered_in_order(server: CalloutServer) -> None:
    # a check that waits first, then quick ones: the answers keep the requests' order
    calls = [
        Case("w", "/wait", checks=("table",)),
        Case("d", "/teapot"),
        Case("a", "/allow", headers={"x-tenant": "t"}),
        Case("w2", "/wait", checks=("table",)),
        Case("d2", "/limited"),
    ]
    raw = await exchange(server.port, b"".join(http_call(c) for c in calls), wait=1.0)
    assert answers(raw) == [200, 409, 200, 200, 429]


async def test_smuggled_second_request_in_a_body_is_just_body(server: CalloutServer) -> None:
    inner = http_call(Case("a", "/allow", headers={"x-tenant": "t"}))
    outer = http_call(Case("d", "/teapot", method="POST", body=inner.decode()))
    assert answers(await exchange(server.port, outer, wait=0.5)) == [409]


async def test_not_a_check_path_is_refused(server: CalloutServer) -> None:
    raw = b"GET /allow HTTP/1.1\r\nhost: a\r\n\r\n"
    assert answers(await exchange(server.port, raw, wait=0.5)) == [400]
    raw = b"GET /legation/checkallow HTTP/1.1\r\nhost: a\r\n\r\n"
    assert answers(await exchange(server.port, raw, wait=0.5)) == [400]
    raw = b"GET /legation/check/allow HTTP/1.1\r\n\r\n"  # no Host
    assert answers(await exchange(server.port, raw, wait=0.5)) == [400]


async def test_no_cr_lf_from_a_decision_reaches_the_answer(server: CalloutServer) -> None:
    for case in (Case("crlf", "/crlf", checks=("table",)), Case("inject", "/inject")):
        raw = await exchange(server.port, http_call(case), wait=0.5)
        assert b"x-evil" not in raw and b"a\r\nb" not in raw
        status, headers, _ = parse_answer(raw)
        assert status == 503 and all("\r" not in v and "\n" not in v for _, v in headers)


def test_filter_refuses_allowed_headers_that_pass_legation_headers() -> None:
    for bad in ("x-legation-policy", "x-*", "x-legation-*", "x-leg*"):
        with pytest.raises(ValueError, match="x-legation-"):
            ef.http_filter(ef.Callout(cluster="c", allowed_headers=[bad]))
    ef.http_filter(ef.Callout(cluster="c", allowed_headers=["x-tenant", "x-b3-*"]))


def test_a_body_in_many_tiny_chunks_is_counted_once_per_chunk() -> None:
    """The size limit keeps a running total: summing every chunk seen so far on each new one
    made a body of n one-byte chunks cost n^2/2 steps, a stalled worker (attacker review)."""
    from legation.fastpath._http import CalloutProtocol, Limits

    calls: list[int] = []
    protocol = CalloutProtocol(lambda call: calls.append(len(call.body)) or b"", Limits())
    protocol.on_message_begin()
    for _ in range(50_000):
        protocol.on_body(b"x")
    assert protocol._body_len == 50_000 and len(protocol._body) == 50_000
    limited = CalloutProtocol(lambda call: b"", Limits(max_body_bytes=10))
    limited.on_message_begin()
    for _ in range(10):
        limited.on_body(b"x")
    with pytest.raises(Exception) as err:  # the class is private
        limited.on_body(b"x")
    assert getattr(err.value, "status", None) == 413
