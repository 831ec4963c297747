"""``legation up``'s banner comes from the plan: a route matching on a header that its own
filter chain computes is left out of the curl examples (a client cannot pick it)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from legation.config import load_mesh
from legation.up import QUICKSTART, Stack


def test_banner_leaves_out_routes_a_client_cannot_pick(tmp_path: Path) -> None:
    out = io.StringIO()
    stack = Stack(QUICKSTART, out=out, log_dir=tmp_path, live=False)
    stack.banner(load_mesh(QUICKSTART))
    text = out.getvalue()
    assert "# route reviews-v2-by-header" in text  # x-version: a client may send it
    assert "-H 'x-version: v2'" in text
    assert "reviews-beta-cohort" not in text  # x-legation-cohort: header_route computes it
    assert "# route reviews-canary (filters header_route)" in text
    assert "legation top" in text  # the quickstart has an access-log service
    assert "legation traces" in text  # and the embedded trace receiver


def test_up_makes_the_access_log_folders_before_the_envoys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Envoy refuses a listener whose access-log file it cannot open: with `--log-dir`
    elsewhere, `.legation/logs` (the quickstart's access-log folder) must still exist."""
    monkeypatch.chdir(tmp_path)
    stack = Stack(QUICKSTART, out=io.StringIO(), log_dir=tmp_path / "elsewhere", live=False)
    stack._access_log_dirs(load_mesh(QUICKSTART))
    assert (tmp_path / ".legation" / "logs").is_dir()
