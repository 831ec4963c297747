"""The plain allow answered as ready bytes (``allow_wire``) is the CheckResponse
``to_check_response`` builds, and the gRPC server sends it, and messages for everything else."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from legation import plugins
from legation.extauthz.checks import ALLOW, Decision
from legation.extauthz.request import RequestContext, new_decision_id
from legation.extauthz.response import allow_wire, plain_allow, to_check_response
from legation.extauthz.service import Settings, start_server, stop_server
from tests.extauthz.test_units import TeapotCheck, TeapotFactory, request


def allow_wire_message(policy: str, decision_id: Any) -> external_auth_pb2.CheckResponse:
    return to_check_response(
        ALLOW, decision_id=decision_id.string_value, deny_status=403, policy=policy
    )


# what a proto string can hold: any Unicode scalar value (no lone surrogates)
texts = st.text(st.characters(exclude_categories=("Cs",)), max_size=300)


@settings(max_examples=300, deadline=None, database=None)
@given(
    policy=texts, decision_id=st.one_of(texts, st.builds(lambda _: new_decision_id(), st.none()))
)
def test_the_bytes_are_the_message(policy: str, decision_id: str) -> None:
    wire = allow_wire(policy, decision_id)
    expected = to_check_response(ALLOW, decision_id=decision_id, deny_status=403, policy=policy)
    assert external_auth_pb2.CheckResponse.FromString(wire) == expected
    assert allow_wire(policy, decision_id) == wire  # the per-policy head, kept, is the same


def test_only_a_plain_allow_is_sent_as_bytes() -> None:
    assert plain_allow(ALLOW) and plain_allow(Decision(allowed=True, reason="fine"))
    assert not plain_allow(Decision(allowed=False))
    for changes in (
        {"headers": {"x-user": "a"}},
        {"response_headers_to_add": {"x-r": "1"}},
        {"request_headers_to_remove": ("x-a",)},
        {"query_parameters_to_set": (("k", "v"),)},
        {"query_parameters_to_remove": ("k",)},
        {"dynamic_metadata": {"k": "v"}},
    ):
        assert not plain_allow(Decision(allowed=True, **changes)), changes  # type: ignore[arg-type]


class PlainTeapot(TeapotCheck):
    name = "plain-teapot"

    async def check(self, ctx: RequestContext) -> Decision:
        if ctx.headers.get("x-plain") == "yes":
            return ALLOW
        return await super().check(ctx)


class PlainTeapotFactory(TeapotFactory):
    name = "plain-teapot"

    def create(self, config: dict[str, Any]) -> PlainTeapot:
        return PlainTeapot()


@pytest.fixture
def teapot() -> Iterator[None]:
    plugins.register("extauthz.check", PlainTeapotFactory())
    yield
    plugins.unregister("extauthz.check", "plain-teapot")


async def test_the_server_answers_over_grpc(teapot: None) -> None:
    config = {"checks": {"tea": {"type": "plain-teapot"}}, "default_checks": ["tea"]}
    server, port = await start_server(Settings(config=config, registry=CollectorRegistry()))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = external_auth_pb2_grpc.AuthorizationStub(channel)
            plain = request()
            plain.attributes.request.http.headers["x-plain"] = "yes"
            plain.attributes.context_extensions["policy"] = "tea.pot"
            tea = request()  # allowed with a header: a message
            tea.attributes.request.http.headers["x-tea"] = "yes"
            denied = request()
            answers = [await stub.Check(r) for r in (plain, tea, denied)]
    finally:
        await stop_server(server, grace=None)
    for answer in answers:
        assert len(answer.dynamic_metadata.fields["decision_id"].string_value) == 32
    ok, with_header, refused = answers
    assert ok == allow_wire_message("tea.pot", ok.dynamic_metadata.fields["decision_id"])
    assert with_header.ok_response.headers[0].header.key == "x-brewed"
    assert refused.status.code != 0 and refused.denied_response.status.code == 429
