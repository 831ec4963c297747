"""The decision cache of the embedded engine and the projected input it is keyed by: a cached
decision is only ever served for the same policy version, entry point and projected input."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from envoy.service.auth.v3 import external_auth_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from legation.extauthz._inputrefs import analyse_packages, nondeterministic_calls
from legation.extauthz.checks import Decision
from legation.extauthz.rego import RegoCheck, RegoConfig
from legation.extauthz.request import RequestContext, build_input, project
from tests.extauthz.conftest import REPO
from tests.extauthz.test_opa_envoy_compat import TUTORIAL_STYLE


def full_request(
    method: str = "POST", path: str = "/people/x?a=1&a=2&b"
) -> external_auth_pb2.CheckRequest:
    r = external_auth_pb2.CheckRequest()
    a = r.attributes
    h = a.request.http
    h.id, h.method, h.path, h.host, h.scheme, h.protocol = "7", method, path, "svc", "http", "h2"
    h.query, h.fragment, h.size, h.body = "a=1", "f", 16, '{"firstname": "Al"}'
    h.headers.update({"content-type": "application/json", "content-length": "19", "x-role": "v"})
    a.request.time.FromSeconds(1700000000)
    a.source.address.socket_address.address = "10.0.0.1"
    a.source.principal = "spiffe://mesh/a"
    a.destination.labels["app"] = "people"
    a.context_extensions["policy"] = "p"
    a.metadata_context.filter_metadata["f"].fields["k"].string_value = "v"
    return r


def test_a_projected_build_equals_projecting_the_whole_document() -> None:
    request = full_request()
    whole = build_input(request)
    for only in [
        {"attributes": {}},
        {"attributes": {"request": {"http": {"method": {}}}}},
        {
            "attributes": {
                "request": {
                    "http": {
                        "headers": {"x-role": {}},
                        "size": {},
                        "query": {},
                        "fragment": {},
                        "body": {},
                        "rawBody": {},
                        "nope": {},
                    },
                    "time": {},
                }
            }
        },
        {
            "attributes": {
                "request": {},
                "source": {"principal": {}},
                "destination": {},
                "contextExtensions": {},
                "metadataContext": {},
                "routeMetadataContext": {},
            }
        },
        {"attributes": {"request": {"http": {}}}, "parsed_path": {}, "parsed_body": {}},
        {"parsed_query": {}, "truncated_body": {}, "version": {}},
    ]:
        assert build_input(request, only) == project(whole, only), only


names = st.text(max_size=8) | st.sampled_from(["x-role", "content-type", "app", "policy"])


@settings(max_examples=200, deadline=None, database=None)
@given(
    headers=st.dictionaries(names, st.text(max_size=8), max_size=6),
    labels=st.dictionaries(names, st.text(max_size=8), max_size=3),
    picked=st.lists(names, max_size=4),
)
def test_a_projected_string_map_is_the_projected_whole(
    headers: dict[str, str], labels: dict[str, str], picked: list[str]
) -> None:
    """Only the projected keys of a string-keyed map are read (the headers): the document, and
    the repr the decision cache keys on, are those of projecting the whole one."""
    request = full_request()
    request.attributes.request.http.headers.clear()
    request.attributes.request.http.headers.update(headers)
    request.attributes.destination.labels.update(labels)
    keys = {k: {} for k in picked}
    only = {
        "attributes": {
            "request": {"http": {"headers": keys, "method": {}}},
            "destination": {"labels": keys},
            "contextExtensions": keys,
        }
    }
    got, want = build_input(request, only), project(build_input(request), only)
    assert got == want
    assert repr(got) == repr(want)
    assert dict(request.attributes.request.http.headers) == headers  # nothing inserted by reading


def test_nondeterministic_builtins_are_found_where_they_are_used() -> None:
    assert nondeterministic_calls("x := time.now_ns()") == {"time.now_ns"}
    assert nondeterministic_calls("[v, _, p] := io.jwt.decode_verify(t, c)") == {
        "io.jwt.decode_verify"
    }
    assert nondeterministic_calls("allow if { print(1) }") == {"print"}
    assert nondeterministic_calls('# time.now_ns()\nx := "http.send"\ny := time.add_date') == set()
    assert nondeterministic_calls("x := data.time.now_ns") == set()  # a rule, not the builtin
    by_pkg = analyse_packages(
        [
            ("a", "package a\nallow if data.lib.fresh"),
            ("lib", "package lib\nfresh if time.now_ns() > 0"),
            ("b", "package b\nallow if input.x == 1"),
        ]
    )
    assert {p: det for p, (_, det) in by_pkg.items()} == {"a": False, "lib": False, "b": True}


POLICY = """package p
import rego.v1
default allow := false
allow if {
	input.attributes.request.http.method == "GET"
	input.jwt.claims.role == "%s"
}
"""


@pytest.fixture
async def make_check() -> Any:
    """RegoCheck instances whose evaluator processes stop with the test."""
    made: list[RegoCheck] = []

    def make(**options: Any) -> RegoCheck:
        made.append(RegoCheck(RegoConfig(**options)))
        return made[-1]

    yield make
    for check in made:
        await check.close()


async def ask(check: RegoCheck, method: str, role: str | None, policy: str = "p") -> Decision:
    r = external_auth_pb2.CheckRequest()
    r.attributes.request.http.method, r.attributes.request.http.path = method, "/x"
    r.attributes.context_extensions["policy"] = policy
    ctx = RequestContext(r)
    if role is not None:
        ctx.claims, ctx.jwt_provider = {"role": role, "sub": "s"}, "p"
    return await check.check(ctx)


async def test_the_cache_serves_only_the_same_input(tmp_path: Path, make_check: Any) -> None:
    (tmp_path / "p.rego").write_text(POLICY % "guest")
    cached = make_check(policy_dir=tmp_path, reload_interval_s=0)
    fresh = make_check(policy_dir=tmp_path, reload_interval_s=0, decision_cache_size=0)
    assert cached.cacheable("p") and not fresh.cacheable("p")
    grid = [(m, r) for m in ("GET", "POST", "get") for r in ("guest", "admin", "", None)]
    for _ in range(2):
        for method, role in grid:
            same = await ask(cached, method, role) == await ask(fresh, method, role)
            assert same, (method, role)
    assert (await ask(cached, "GET", "guest")).allowed
    assert not (await ask(cached, "GET", "admin")).allowed
    assert cached.cache_misses == len(grid) and cached.cache_hits == len(grid) + 2


async def test_the_cache_is_bounded_and_drops_the_least_recent(
    tmp_path: Path, make_check: Any
) -> None:
    (tmp_path / "p.rego").write_text(POLICY % "guest")
    check = make_check(policy_dir=tmp_path, reload_interval_s=0, decision_cache_size=2)
    for role in ("a", "b", "a", "c", "a"):
        await ask(check, "GET", role)
    assert len(check._cache) == 2 and check.cache_hits == 2  # "b" went, "a" stayed


async def test_a_new_policy_version_never_sees_old_decisions(
    tmp_path: Path, make_check: Any
) -> None:
    source = tmp_path / "p.rego"
    source.write_text(POLICY % "guest")
    check = make_check(policy_dir=tmp_path, reload_interval_s=0)
    assert (await ask(check, "GET", "guest")).allowed
    assert (await ask(check, "GET", "guest")).allowed and check.cache_hits == 1
    source.write_text(POLICY % "admin")
    os.utime(source, ns=(1, 1))  # a new fingerprint even within one mtime tick
    assert await check.store.reload()
    assert not (await ask(check, "GET", "guest")).allowed
    assert (await ask(check, "GET", "admin")).allowed
    assert check.cache_hits == 1


async def test_policies_that_read_the_clock_or_the_whole_input_are_not_cached(
    tmp_path: Path, make_check: Any
) -> None:
    (tmp_path / "tutorial.rego").write_text(TUTORIAL_STYLE)
    (tmp_path / "whole.rego").write_text(
        "package whole\nimport rego.v1\n"
        "allow if input.attributes.request.http.method == 'GET'".replace("'", '"')
        + "\nx := input\n"
    )
    check = make_check(policy_dir=tmp_path, reload_interval_s=0)
    assert not check.cacheable("envoy.authz") and not check.cacheable("whole")
    for policy in ("envoy.authz", "whole", "envoy.authz", "whole"):
        await ask(check, "GET", "guest", policy)
    assert check.cache_hits == check.cache_misses == 0


async def test_the_shipped_policies_decide_the_same_with_and_without_the_cache(
    make_check: Any,
) -> None:
    checks = [
        make_check(policy_dir=REPO / "policies", reload_interval_s=0, decision_cache_size=n)
        for n in (0, 4096)
    ]
    for _ in range(2):
        for method in ("GET", "POST", "DELETE"):
            for role in ("guest", "admin", None):
                results = [await ask(c, method, role, "envoy.authz") for c in checks]
                assert results[0] == results[1]
