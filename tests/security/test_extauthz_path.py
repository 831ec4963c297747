"""``parsed_path`` / ``parsed_query`` as opa-envoy-plugin builds them since its 2026 fix: a
request target is cut at ``?``, never parsed as a URL, so ``//admin/dashboard`` keeps ``admin``.

The first table is opa-envoy-plugin's own ``TestParsedPathAndQuery`` (envoyauth/request_test.go);
the second follows the behaviour of the Go functions it calls (``url.PathUnescape``,
``url.ParseQuery``) on the inputs its fix is about. The last test sends the bypass through a
real Envoy to a deny rule on ``parsed_path[0] == "admin"``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from legation import plugins
from legation.extauthz.checks import Decision, PythonCheck
from legation.extauthz.errors import AuthzError
from legation.extauthz.request import RequestContext, parse_path
from tests.extauthz.conftest import Route, Stack, StackPool

# opa-envoy-plugin envoyauth/request_test.go TestParsedPathAndQuery: path -> (path, query)
OPA_ENVOY_PLUGIN_CASES: list[tuple[str, list[str], dict[str, list[str]]]] = [
    ("/my/test/path", ["my", "test", "path"], {}),
    ("/my/test/path?a=1", ["my", "test", "path"], {"a": ["1"]}),
    ("/my/test/path?a=1&a=2", ["my", "test", "path"], {"a": ["1", "2"]}),
    ("/my/test/path?a=1&b=2", ["my", "test", "path"], {"a": ["1"], "b": ["2"]}),
    ("/my/test/path?a=1&a=new%0aline", ["my", "test", "path"], {"a": ["1", "new\nline"]}),
    ("%2Fmy%2Ftest%2Fpath?a=1&a=new%0aline", ["my", "test", "path"], {"a": ["1", "new\nline"]}),
    ("//x/people", ["x", "people"], {}),
    ("//admin/dashboard", ["admin", "dashboard"], {}),
    ("//x/people?a=1", ["x", "people"], {"a": ["1"]}),
]

# the same functions on the other shapes the fix is about
GO_SEMANTICS_CASES: list[tuple[str, list[str], dict[str, list[str]]]] = [
    ("", [""], {}),
    ("/", [""], {}),
    ("///", [""], {}),
    ("/a/", ["a", ""], {}),
    ("/a//b", ["a", "", "b"], {}),  # empty segments are kept
    ("/a/./b/../c", ["a", ".", "b", "..", "c"], {}),  # dot segments are not resolved
    ("/%2E%2E/admin", ["..", "admin"], {}),
    ("/%2Fadmin/x", ["admin", "x"], {}),  # an encoded slash is a separator, after decoding
    ("/%2F%2Fadmin", ["admin"], {}),
    ("/admin%2Fdashboard", ["admin", "dashboard"], {}),
    ("/a+b/%20c", ["a+b", " c"], {}),  # '+' is a plus in the path
    ("/caf%C3%A9", ["café"], {}),
    ("/caf%e9", ["caf\ufffd"], {}),  # bytes that are not UTF-8 read as U+FFFD
    ("/a?", ["a"], {}),
    ("/a?x", ["a"], {"x": [""]}),
    ("/a?x=", ["a"], {"x": [""]}),
    ("/a?=v", ["a"], {"": ["v"]}),
    ("/a?&&x=1&", ["a"], {"x": ["1"]}),  # empty pairs are skipped
    ("/a?x=1&y=2&x=3", ["a"], {"x": ["1", "3"], "y": ["2"]}),
    ("/a?x=a+b&y=a%2Bb", ["a"], {"x": ["a b"], "y": ["a+b"]}),  # '+' is a space in the query
    ("/a?k%20ey=v=w", ["a"], {"k ey": ["v=w"]}),
    ("/a?x=1?y=2", ["a"], {"x": ["1?y=2"]}),  # only the first '?' starts the query
    ("/a%3Fx=1", ["a?x=1"], {}),
    ("/a#frag?x=1", ["a#frag"], {"x": ["1"]}),
]

# opa-envoy-plugin fails the request on these (url.PathUnescape / url.ParseQuery errors)
MALFORMED = [
    "/a%zz",
    "/a%",
    "/a%4",
    "/%%41",
    "/a?x=%",
    "/a?x=%g1",
    "/a?%zz=1",
    "/a?x=1;y=2",
    "/a?" + "&" * 10_000 + "x=1",  # more than Go's 10,000 parameters
]


@pytest.mark.parametrize(("path", "segments", "query"), OPA_ENVOY_PLUGIN_CASES + GO_SEMANTICS_CASES)
def test_parsed_path_and_query_as_opa_envoy_plugin(
    path: str, segments: list[str], query: dict[str, list[str]]
) -> None:
    assert parse_path(path) == (segments, query)


@pytest.mark.parametrize("path", MALFORMED, ids=lambda p: p[:20])
def test_malformed_targets_are_a_client_error(path: str) -> None:
    with pytest.raises(AuthzError) as err:
        parse_path(path)
    assert err.value.code == "malformed_path"
    assert err.value.status == 400
    assert err.value.is_client_error


def test_ten_thousand_parameters_still_parse() -> None:
    parsed = parse_path("/a?" + "&".join(["x=1"] * 10_000))[1]
    assert len(parsed["x"]) == 10_000


class AdminDeny(PythonCheck):
    """The deny rule of the issue, written against the input document as a Rego policy would:
    ``deny if input.parsed_path[0] == "admin"``."""

    name = "admin_deny"

    async def check(self, ctx: RequestContext) -> Decision:
        segments = ctx.input()["parsed_path"]
        return Decision(allowed=segments[0] != "admin", http_status=403)


class AdminDenyFactory:
    name = "admin_deny"

    def validate(self, raw: Any) -> dict[str, Any]:
        return dict(raw)

    def create(self, config: dict[str, Any]) -> AdminDeny:
        return AdminDeny()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: Any) -> Iterator[Stack]:
    plugins.register("extauthz.check", AdminDenyFactory())
    pool = StackPool(tmp_path_factory.mktemp("path"))
    try:
        yield pool.make(
            config={"checks": {"deny": {"type": "admin_deny"}}, "default_checks": ["deny"]},
            routes=[Route("/", checks=["deny"])],
        )
    finally:
        pool.close()
        plugins.unregister("extauthz.check", "admin_deny")


@pytest.mark.integration
@pytest.mark.parametrize(
    "path",
    [
        "/admin/dashboard",
        "//admin/dashboard",
        "///admin",
        "/%2Fadmin/dashboard",
        "/admin%2Fdashboard",
    ],
)
def test_deny_on_first_segment_holds_through_envoy(stack: Stack, path: str) -> None:
    before = stack.upstream.requests
    r = stack.client.get(path)
    assert r.status == 403, (path, r.status, r.body)
    assert stack.upstream.requests == before


@pytest.mark.integration
def test_other_paths_pass_and_malformed_ones_are_refused(stack: Stack) -> None:
    assert stack.client.get("/public//admin").status == 200
    bad = stack.client.get("/x%zz")
    assert bad.status == 400
    assert bad.json() == {"error": "malformed_path"}
