"""The event loop the request-path services run on (legation._loop): uvloop unless told."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2 as common_rl
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from hypothesis import given
from hypothesis import strategies as st

from legation import _loop
from legation.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
_LEGATION = (sys.executable, "-m", "legation.cli")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, "uvloop"),
        ("uvloop", "uvloop"),
        (" UVLoop ", "uvloop"),
        ("", "uvloop"),
        ("asyncio", "asyncio"),
        ("ASYNCIO", "asyncio"),
    ],
)
def test_choice_reads_the_variable(value: str | None, expected: str) -> None:
    env = {} if value is None else {_loop.ENV: value}
    assert _loop.choice(env) == expected


@pytest.mark.parametrize(
    "value", ["asyncio\x1c", "\u3000uvloop", "uvloop\x85", "uv loop", "asyncio;"]
)
def test_only_ascii_blanks_around_a_name_are_forgiven(value: str) -> None:
    with pytest.raises(ConfigError, match=_loop.ENV):
        _loop.choice({_loop.ENV: value})


def test_a_long_value_is_shown_cut() -> None:
    with pytest.raises(ConfigError) as err:
        _loop.choice({_loop.ENV: "x" * 100_000})
    assert len(str(err.value)) < 200 and "(100000 characters)" in str(err.value)


@given(
    st.text(max_size=40).filter(
        lambda s: s.strip(" \t\r\n").lower() not in ("", "uvloop", "asyncio")
    )
)
def test_any_other_value_is_refused_naming_the_variable(value: str) -> None:
    with pytest.raises(ConfigError) as err:
        _loop.choice({_loop.ENV: value})
    message = str(err.value)
    assert message.startswith(f"{_loop.ENV}: expected one of uvloop, asyncio, got ")
    assert repr(value) in message  # quoted: no raw control character reaches a terminal
    assert err.value.code == "invalid_event_loop"


async def _kind() -> tuple[str, str]:
    return _loop.running(), type(asyncio.get_running_loop()).__module__


def test_run_uses_uvloop_by_default_and_asyncio_when_told(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(_loop.ENV, raising=False)
    running, module = _loop.run(_kind())
    assert running == "uvloop" and module.startswith("uvloop")
    monkeypatch.setenv(_loop.ENV, "asyncio")
    running, module = _loop.run(_kind())
    assert running == "asyncio" and module.startswith("asyncio")


def test_new_event_loop_makes_the_chosen_kind(monkeypatch: pytest.MonkeyPatch) -> None:
    for choice, module in (("uvloop", "uvloop"), ("asyncio", "asyncio")):
        monkeypatch.setenv(_loop.ENV, choice)
        loop = _loop.new_event_loop()
        try:
            assert type(loop).__module__.startswith(module)
        finally:
            loop.close()


def test_a_refused_choice_closes_the_coroutine_unrun(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(_loop.ENV, "tokio")
    ran = []

    async def main() -> None:
        ran.append(1)

    coro = main()
    with pytest.raises(ConfigError):
        _loop.run(coro)
    assert coro.cr_frame is None  # closed: no "never awaited" warning later, and it never ran
    assert ran == []


def _serve(tmp_path: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    config = tmp_path / "limits.yaml"
    config.write_text(
        "domain: loop\ndescriptors:\n  - key: user\n    rate_limit: {unit: minute, "
        "requests_per_unit: 1}\n"
    )
    return subprocess.Popen(
        [*_LEGATION, "serve", "ratelimit", "--config", str(config), "--listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=env,
    )


@pytest.mark.integration
@pytest.mark.parametrize("choice", ["uvloop", "asyncio"])
def test_legation_serve_runs_on_the_chosen_loop(tmp_path: Path, choice: str) -> None:
    """``legation serve`` says which loop it runs on, and serves on it: the second hit of a
    one-a-minute limit is refused."""
    env = {k: v for k, v in os.environ.items() if k != _loop.ENV}
    if choice == "asyncio":
        env[_loop.ENV] = choice
    proc = _serve(tmp_path, env)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("ratelimit (pid ") and f", {choice}) on 127.0.0.1:" in line, line
        port = int(line.rsplit(":", 1)[1])
        import grpc

        request = rls_pb2.RateLimitRequest(
            domain="loop",
            descriptors=[
                common_rl.RateLimitDescriptor(
                    entries=[common_rl.RateLimitDescriptor.Entry(key="user", value="ann")]
                )
            ],
        )
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = rls_pb2_grpc.RateLimitServiceStub(channel)
            codes = [stub.ShouldRateLimit(request, timeout=5).overall_code for _ in range(2)]
        assert codes == [rls_pb2.RateLimitResponse.OK, rls_pb2.RateLimitResponse.OVER_LIMIT]
    finally:
        proc.terminate()
        assert proc.wait(15) == 0
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def test_legation_serve_refuses_an_unknown_loop_before_starting(tmp_path: Path) -> None:
    proc = _serve(tmp_path, {**os.environ, _loop.ENV: "tokio\x1b[31m"})
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert out == ""  # nothing started
    assert "legation serve ratelimit: LEGATION_EVENT_LOOP: expected one of uvloop, asyncio" in err
    assert "\x1b" not in err and "'tokio\\x1b[31m'" in err


def test_legation_up_refuses_an_unknown_loop_before_starting_anything(tmp_path: Path) -> None:
    done = subprocess.run(
        [*_LEGATION, "up", "--log-dir", str(tmp_path / "logs")],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,  # no mesh here, and none started: the check comes first
        env={**os.environ, _loop.ENV: "trio"},
    )
    assert done.returncode == 2
    assert done.stderr.startswith("legation up: LEGATION_EVENT_LOOP: expected one of")
    assert not (tmp_path / "logs").exists() and not (tmp_path / ".legation").exists()
