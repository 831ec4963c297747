"""Request body mutation, buffered and streamed, through the real Envoy."""

from __future__ import annotations

import time

import pytest

pytestmark = pytest.mark.integration


def test_buffered_body_is_replaced_with_a_true_content_length(stack):
    r = stack.get("/buffered/x", method="POST", body=b"hello world")
    assert r.status == 200
    echoed = r.json()
    assert echoed["body"] == "<wrapped>hello world</wrapped>"
    assert echoed["chunked"] is False
    assert echoed["headers"]["content-length"] == str(len(echoed["body"]))


def test_streamed_body_is_mutated_chunk_by_chunk(stack):
    chunks = [bytes([97 + i % 26]) * 40_000 for i in range(5)]

    def paced():  # pacing, not timing: each chunk reaches Envoy as its own read
        for chunk in chunks:
            time.sleep(0.02)
            yield chunk

    before = stack.metric("legation_extproc_phases_total", chain="streamed", phase="request_body")
    r = stack.get("/streamed/x", method="POST", body=paced())
    assert r.status == 200
    echoed = r.json()
    assert echoed["body"] == b"".join(chunks).upper().decode()
    after = stack.metric("legation_extproc_phases_total", chain="streamed", phase="request_body")
    assert after - before >= 2  # streamed: more than one message for a 200 KB body
