"""The HTTP call-out reads a call straight into the policy input (``CallContext``, no protobuf
round trip); the document must be the one gRPC's path builds from the ``CheckRequest`` the call
stands for (``to_check_request`` then ``build_input``), for any call Envoy (or an attacker on the
port) could send: random header names, values, repeats, paths, bodies, options and projections.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from envoy.service.auth.v3 import external_auth_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from legation.extauthz.errors import AuthzError
from legation.extauthz.request import InputOptions, InputPaths, RequestContext
from legation.fastpath.contract import (
    CHECKS_HEADER,
    PATH_PREFIX,
    POLICY_HEADER,
    REMOTE_ADDRESS_HEADER,
    ROUTE_HEADER,
)
from legation.fastpath.request import (
    _CALL_HEADERS,
    CallContext,
    NotACheck,
    check_request,
    read_call,
    to_check_request,
)

PROPERTY = settings(
    max_examples=400,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)

raw = st.binary(max_size=24)
names = st.one_of(
    st.sampled_from(
        [
            b"Host",
            b"host",
            b"content-type",
            b"Content-Type",
            b"content-length",
            b"authorization",
            b"x-envoy-auth-partial-body",
            b"x-envoy-internal",
            b"cookie",
            b"x-role",
            b"X-Role",
            b":authority",
            b":path",
            POLICY_HEADER.encode(),
            CHECKS_HEADER.encode(),
            ROUTE_HEADER.encode(),
            REMOTE_ADDRESS_HEADER.encode(),
        ]
    ),
    raw,
)
values = st.one_of(
    st.sampled_from(
        [
            b"gw.example",
            b"application/json",
            b"application/x-www-form-urlencoded",
            b"multipart/form-data; boundary=x",
            b"true",
            b"3",
            b"Bearer abc",
            b"",
        ]
    ),
    raw,
)
targets = st.builds(
    lambda lead, rest: PATH_PREFIX.encode() + lead + rest,
    st.sampled_from([b"/", b"*", b"", b"x"]),
    st.binary(max_size=30) | st.text("abc/?&=%+;.2fF\xe9 ", max_size=30).map(str.encode),
)
bodies = st.one_of(
    st.just(b""),
    st.sampled_from([b'{"a": 1}', b"a=1&b=2", b'{"a": [1, 2.5, null]}', b"--x--", b"\xff\xfe"]),
    raw,
)
projections: st.SearchStrategy[InputPaths | None] = st.sampled_from(
    [
        None,
        {"attributes": {}},
        {"attributes": {"request": {"http": {"headers": {"x-role": {}}, "method": {}}}}},
        {"attributes": {"request": {"http": {"headers": {}, "body": {}, "rawBody": {}}}}},
        {"attributes": {"contextExtensions": {"policy": {}}}, "version": {}},
        {"parsed_path": {}, "parsed_query": {}},
        {"parsed_body": {}, "truncated_body": {}},
        {"jwt": {"claims": {}}, "spiffe_id": {}, "source_principal": {}},
    ]
)


def _document(ctx: RequestContext, only: InputPaths | None) -> Any:
    try:
        return ctx.input(only)
    except AuthzError as e:
        return ("error", e.code, str(e))


@PROPERTY
@given(
    method=st.sampled_from([b"GET", b"POST", b"get"]) | raw,
    target=targets,
    headers=st.lists(st.tuples(names, values), max_size=8).map(lambda h: [(b"host", b"h"), *h]),
    body=bodies,
    skip_body=st.booleans(),
    only=projections,
)
def test_call_input_is_the_check_request_input(
    method: bytes,
    target: bytes,
    headers: list[tuple[bytes, bytes]],
    body: bytes,
    skip_body: bool,
    only: InputPaths | None,
) -> None:
    options = InputOptions(skip_body_parse=skip_body)
    try:
        call = read_call(method, target, headers, body, {})
    except NotACheck as e:
        with pytest.raises(NotACheck, match=str(e)):
            check_request(method, target, headers, body, {})
        return
    message = check_request(method, target, headers, body, {})
    fast, slow = CallContext(call, options), RequestContext(message, options)
    assert fast.request == message == to_check_request(call)
    assert (fast.method, fast.path, fast.spiffe_id) == (slow.method, slow.path, slow.spiffe_id)
    assert fast.body_size() == slow.body_size()
    assert fast.headers == dict(slow.headers)
    assert fast.extensions == dict(slow.extensions)
    got, want = _document(fast, only), _document(slow, only)
    assert got == want
    if not isinstance(want, tuple):  # the same JSON for the engine (types, not only equality)
        assert json.dumps(got, sort_keys=True) == json.dumps(want, sort_keys=True)
        assert _document(fast, None) == _document(slow, None)


def _check_request_before(
    method: bytes,
    target: bytes,
    headers: list[tuple[bytes, bytes]],
    body: bytes,
    call: dict[str, str],
) -> external_auth_pb2.CheckRequest:
    """``check_request`` as it was before ``read_call`` (main at bf0414a), verbatim but for names:
    the reference the new reading must agree with."""
    prefix = PATH_PREFIX.encode()
    if not target.startswith(prefix) or target[len(prefix) : len(prefix) + 1] not in (b"/", b"*"):
        raise NotACheck(f"the request target does not start with {PATH_PREFIX}/")
    path = target[len(prefix) :].decode("utf-8", "replace")
    m = method.decode("latin-1")
    request = external_auth_pb2.CheckRequest()
    attrs = request.attributes
    http = attrs.request.http
    http.method = m
    http.path = path
    out = http.headers
    host = ""
    for raw_name, raw_value in headers:
        name = raw_name.decode("latin-1").lower()
        value = raw_value.decode("utf-8", "replace")
        if name == "host":
            if host:
                raise NotACheck("more than one Host header")
            host = value
        elif name == POLICY_HEADER:
            attrs.context_extensions["policy"] = value
        elif name == CHECKS_HEADER:
            attrs.context_extensions["checks"] = value
        elif call is not None and name in (ROUTE_HEADER, REMOTE_ADDRESS_HEADER):
            if name in call:
                raise NotACheck(f"more than one {name} header")
            call[name] = value
        if name in _CALL_HEADERS:
            continue
        out[name] = f"{out[name]},{value}" if name in out else value
    if not host:
        raise NotACheck("no Host header")
    http.host = host
    out[":authority"] = host
    out[":method"] = m
    out[":path"] = path
    if body:
        try:
            http.body = body.decode()
        except UnicodeDecodeError:
            http.raw_body = body
    return request


@PROPERTY
@given(
    method=st.sampled_from([b"GET", b"POST"]) | raw,
    target=targets,
    headers=st.lists(st.tuples(names, values), max_size=10),
    body=bodies,
)
def test_reading_a_call_is_what_building_the_message_was(
    method: bytes, target: bytes, headers: list[tuple[bytes, bytes]], body: bytes
) -> None:
    """The same message, the same fused-call headers and the same refusals as before, for any
    headers (none, two Hosts, repeated route headers, any bytes in names and values)."""
    call_new: dict[str, str] = {}
    call_old: dict[str, str] = {}
    try:
        want = _check_request_before(method, target, headers, body, call_old)
    except NotACheck as e:
        with pytest.raises(NotACheck) as info:
            read_call(method, target, headers, body, call_new)
        assert str(info.value) == str(e)
        return
    assert to_check_request(read_call(method, target, headers, body, call_new)) == want
    assert call_new == call_old


def test_a_check_reading_the_message_gets_it_built_once() -> None:
    call = read_call(
        b"POST",
        PATH_PREFIX.encode() + b"/a?b=1",
        [
            (b"host", b"gw"),
            (b"X-Role", b"admin"),
            (b"x-role", b"ops"),
            (POLICY_HEADER.encode(), b"p"),
        ],
        b"\xff",
    )
    ctx = CallContext(call)
    message = ctx.request
    assert ctx.request is message
    http = message.attributes.request.http
    assert http.headers["x-role"] == "admin,ops"
    assert http.raw_body == b"\xff" and not http.body
    assert dict(message.attributes.context_extensions) == {"policy": "p"}
    assert ctx.input()["attributes"]["request"]["http"]["rawBody"] == "/w=="
