"""The built-in filters through the real Envoy."""

from __future__ import annotations

import re

import pytest

from legation.extproc.filters.header_route import bucket_of
from tests.extproc.conftest import jwt

pytestmark = pytest.mark.integration


# -- header_route -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"cookie": "a=1; canary=yes"}, "canary"),
        ({"cookie": "canary=no"}, "stable"),
        ({"x-beta": "1"}, "canary"),
        ({"authorization": "Bearer " + jwt({"group": "beta"})}, "canary"),
        ({"authorization": "Bearer " + jwt({"group": "other"})}, "stable"),
        ({"authorization": "Bearer not-a-jwt"}, "stable"),
        ({}, "stable"),
        # a client cannot pick the cohort by sending the routing header itself
        ({"x-legation-cohort": "canary"}, "stable"),
    ],
)
def test_header_route_picks_the_upstream(any_stack, headers, expected):
    r = any_stack.get("/route/x", headers=headers)
    assert r.status == 200
    echoed = r.json()
    assert echoed["service"] == expected
    assert echoed["headers"]["x-legation-cohort"] == expected


def test_header_route_hash_bucket_is_sticky_per_user(any_stack):
    users = [f"user-{i}" for i in range(24)]
    seen = {}
    for uid in users:
        first = any_stack.get("/route/x", headers={"x-user-id": uid}).json()["service"]
        again = any_stack.get("/route/x", headers={"x-user-id": uid}).json()["service"]
        assert first == again, uid
        seen[uid] = first
    expected = {
        uid: "canary" if bucket_of(uid, seed="s1", buckets=100) < 30 else "stable" for uid in users
    }
    assert seen == expected
    assert set(seen.values()) == {"canary", "stable"}  # the sample really exercises both


def test_clearing_the_route_cache_is_what_changes_the_upstream(any_stack):
    # Same rule and header; the only difference is clear_route_cache.
    cleared = any_stack.get("/route/x", headers={"x-beta": "1"}).json()
    kept = any_stack.get("/route-noclear/x", headers={"x-beta": "1"}).json()
    assert cleared["service"] == "canary"
    assert kept["headers"]["x-legation-cohort"] == "canary"
    assert kept["service"] == "stable"


# -- headers ------------------------------------------------------------------------------------


def test_headers_filter_mutates_request_and_response(any_stack):
    r = any_stack.get(
        "/headers-echo/x",
        headers={"x-debug": "1", "x-old-name": "moved", "x-via": "client", "x-env": "spoofed"},
    )
    assert r.status == 200
    up = r.json()["headers"]
    assert up["x-env"] == "test"
    assert "x-debug" not in up
    assert "x-old-name" not in up
    assert up["x-new-name"] == "moved"
    assert up["x-via"].split(",") == ["client", "legation"]
    r = any_stack.get("/headers/x")
    assert r.status == 200
    assert r.headers["cache-control"] == "no-store"
    assert "x-demo-version" not in r.headers
    assert r.headers["x-demo-service"] == "stable"


# -- request_id ---------------------------------------------------------------------------------


def test_request_id_generated_echoed_and_in_metadata(stack):
    r = stack.get("/reqid/x")
    rid = r.headers["x-correlation-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", rid)
    up = r.json()["headers"]
    assert up["x-correlation-id"] == rid
    assert up["x-meta-rid"] == rid  # dynamic metadata read back by Envoy's route
    assert stack.get("/reqid/x").headers["x-correlation-id"] != rid


def test_request_id_keeps_a_well_formed_one_and_replaces_junk(stack):
    kept = stack.get("/reqid/x", headers={"x-correlation-id": "abc-123.x"})
    assert kept.headers["x-correlation-id"] == "abc-123.x"
    assert kept.json()["headers"]["x-correlation-id"] == "abc-123.x"
    junk = stack.get("/reqid/x", headers={"x-correlation-id": "a b<script>"})
    assert re.fullmatch(r"[0-9a-f]{32}", junk.headers["x-correlation-id"])
    assert junk.json()["headers"]["x-correlation-id"] == junk.headers["x-correlation-id"]


# -- body_redact and mode override ------------------------------------------------------------


def test_body_redact_masks_json_fields_and_fixes_length(stack):
    before = stack.metric("legation_extproc_phases_total", chain="redact", phase="response_body")
    r = stack.get(
        "/redact/x",
        headers={"authorization": "Bearer s3cr3t", "x-secret": "hush", "x-path-secret": "deep"},
    )
    assert r.status == 200
    doc = r.json()
    assert doc["headers"]["authorization"] == "***"
    assert doc["headers"]["x-secret"] == "***"
    assert doc["headers"]["x-path-secret"] == "***"
    assert doc["service"] == "stable"
    assert b"s3cr3t" not in r.body and b"hush" not in r.body
    assert int(r.headers["content-length"]) == len(r.body)
    after = stack.metric("legation_extproc_phases_total", chain="redact", phase="response_body")
    assert after == before + 1


def test_mode_override_only_fetches_json_bodies(stack):
    """The route sends response headers only; the body comes only when the filter asks."""
    before = stack.metric("legation_extproc_phases_total", chain="redact", phase="response_body")
    heads = stack.metric("legation_extproc_phases_total", chain="redact", phase="response_headers")
    r = stack.get("/redact-echo/text")
    assert r.status == 200
    assert r.body == b"plain text with authorization: keep-me"
    assert (
        stack.metric("legation_extproc_phases_total", chain="redact", phase="response_body")
        == before
    )
    assert (
        stack.metric("legation_extproc_phases_total", chain="redact", phase="response_headers")
        == heads + 1
    )
    r = stack.get("/redact-echo/json", headers={"authorization": "Bearer t"})
    assert r.json()["headers"]["authorization"] == "***"
    assert (
        stack.metric("legation_extproc_phases_total", chain="redact", phase="response_body")
        == before + 1
    )
