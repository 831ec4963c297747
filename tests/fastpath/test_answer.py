"""A plain allow is answered from constant bytes and passes the validator without its loops;
both shortcuts must give what the general code gives."""

from __future__ import annotations

import pytest

from legation.extauthz.checks import Decision
from legation.extauthz.errors import AuthzError
from legation.fastpath import answer
from legation.fastpath.contract import Forwarded


@pytest.mark.parametrize("keep_alive", [True, False])
@pytest.mark.parametrize("empty", [{}, (), []])
def test_a_plain_allow_is_the_general_answer(keep_alive: bool, empty: object) -> None:
    plain = Decision(allowed=True, headers=empty, response_headers_to_add=empty)  # type: ignore[arg-type]
    close = b"" if keep_alive else b"connection: close\r\n"
    assert answer.encode(plain, deny_status=403, keep_alive=keep_alive) == (
        b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n" + close + b"\r\n"
    )
    assert answer.validator(Forwarded(()))(plain) is None


def test_an_allow_with_something_to_say_takes_the_general_way() -> None:
    with_header = Decision(allowed=True, headers={"x-legation-user": "bob"})
    assert b"x-legation-user: bob\r\n" in answer.encode(with_header, deny_status=403)
    removing = Decision(allowed=True, request_headers_to_remove=("x-a",))
    assert b"x-a\r\n" in answer.encode(removing, deny_status=403)
    validate = answer.validator(Forwarded(()))
    with pytest.raises(AuthzError, match="not one the filter"):
        validate(Decision(allowed=True, headers={"x-other": "1"}))
    with pytest.raises(AuthzError, match="gRPC call-out"):
        validate(Decision(allowed=True, query_parameters_to_set=(("a", "1"),)))
    with pytest.raises(AuthzError, match="cannot answer 200"):
        validate(Decision(allowed=False, http_status=200))
