"""One decision table through both call-outs, in-process: the gRPC servicer's ``Check`` and the
fast-path server (a real socket, httptools, the same servicer) give Envoy the same answer."""

from __future__ import annotations

import asyncio

import pytest

from legation.fastpath.server import CalloutServer
from tests.fastpath.cases import (
    CASES,
    GRPC_ONLY,
    Case,
    from_grpc,
    from_http,
    grpc_request,
    http_call,
)


async def ask_http(server: CalloutServer, case: Case) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(http_call(case))
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        return head + await reader.readexactly(length)
    finally:
        writer.close()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_same_answer_both_ways(server: CalloutServer, case: Case) -> None:
    grpc = from_grpc(await server.servicer.Check(grpc_request(case), None))
    http = from_http(await ask_http(server, case))
    assert http == grpc
    assert (grpc.allowed, grpc.status) == (case.allowed, case.status)


@pytest.mark.parametrize("case", GRPC_ONLY, ids=[c.name for c in GRPC_ONLY])
async def test_what_http_cannot_carry_fails_closed(server: CalloutServer, case: Case) -> None:
    grpc = from_grpc(await server.servicer.Check(grpc_request(case), None))
    http = from_http(await ask_http(server, case))
    assert grpc.allowed
    assert (http.allowed, http.status, http.body) == (False, 503, '{"error":"not_in_http_mode"}')


async def test_the_table_is_not_vacuous(server: CalloutServer) -> None:
    by_name = {c.name: c for c in CASES}
    teapot = from_http(await ask_http(server, by_name["deny: status, body, two set-cookie"]))
    assert teapot == from_http(
        await ask_http(server, by_name["deny: status, body, two set-cookie"])
    )
    assert teapot.body == "no tea"
    assert ("set-cookie", "a=1") in teapot.to_client and ("set-cookie", "b=2") in teapot.to_client
    multi = from_http(await ask_http(server, by_name["several values of one upstream header"]))
    assert multi.upstream == (("x-user", "a,b"),)
    removed = from_http(
        await ask_http(server, by_name["allow removes a header, adds x-legation-*"])
    )
    assert removed.removed == ("x-drop",) and removed.upstream == (("x-legation-user", "bob"),)
