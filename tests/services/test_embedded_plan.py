"""legation.services.planning(): the files the embedded services need, validated with the mesh, and
EmbeddedServices starting, swapping and stopping real gRPC servers on loopback."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import grpc
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

from legation.config import MeshConfigError, load_mesh
from legation.services import EmbeddedServices, plan, route_chains
from tests.conftest import free_port

QUICKSTART = Path(__file__).parents[2] / "examples" / "quickstart" / "mesh.yaml"

MESH = """\
services: [{{name: web, port: 9080, endpoints: [{{port: {app}}}]}}]
{blocks}
routes:
  - name: web
    mesh_hosts: [web]
    to: {{service: web}}
    filters: [{{name: headers, options: {{request: {{set: {{x-tag: {tag}}}}}}}}}]
"""


def write(tmp: Path, blocks: str, *, tag: str = "one", **files: str) -> Path:
    for name, text in files.items():
        (tmp / name).write_text(text)
    if "extproc" not in blocks:  # the route's filters need one
        blocks += "\nextproc: {port: 18011, embedded: false}"
    path = tmp / "mesh.yaml"
    path.write_text(MESH.format(app=free_port(), blocks=blocks, tag=tag))
    return path


def plan_error(path: Path, **kwargs: object) -> str:
    with pytest.raises(MeshConfigError) as info:
        plan(load_mesh(path), mesh_path=path, **kwargs)  # type: ignore[arg-type]
    return str(info.value)


def test_the_quickstart_plans_all_four() -> None:
    p = plan(load_mesh(QUICKSTART), mesh_path=QUICKSTART)
    assert sorted(p.embedded) == ["accesslog", "extauthz", "extproc", "ratelimit"]
    assert [p.embedded[k].port for k in ("extauthz", "extproc", "ratelimit", "accesslog")] == [
        18010,
        18011,
        18012,
        18013,
    ]
    chains = p.embedded["extproc"].live["chains"]
    assert chains is not None and sorted(chains.chains) == ["reviews-beta-cohort", "reviews-canary"]
    # the policy dir in authz.yaml is resolved against authz.yaml's folder, not the cwd
    checks = p.embedded["extauthz"].live["config"]["checks"]
    assert (
        Path(checks["rego"]["options"]["policy_dir"]).resolve()
        == (QUICKSTART.parents[2] / "policies" / "quickstart").resolve()
    )


def test_missing_authz_file_names_mesh_file_and_field(tmp_path: Path) -> None:
    path = write(tmp_path, "extauthz: {port: 18010, config: nope.yaml}")
    assert plan_error(path) == (
        f"{path}: extauthz.config: cannot read {tmp_path / 'nope.yaml'}: No such file or directory"
    )


def test_bad_authz_file_names_both_files(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "extauthz: {port: 18010, config: authz.yaml}",
        **{"authz.yaml": "checks: {a: {type: rego}}\ndefault_checks: [b]\n"},
    )
    message = plan_error(path)
    assert message.startswith(f"{path}: extauthz.config: {tmp_path / 'authz.yaml'}: ")
    assert "default_checks" in message


def test_ratelimit_domain_must_be_in_its_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "ratelimit: {port: 18012, config: rl.yaml, domain: mesh}",
        **{"rl.yaml": "domain: other\ndescriptors: []\n"},
    )
    assert plan_error(path) == (
        f"{path}: ratelimit.domain: 'mesh' is not the domain of {tmp_path / 'rl.yaml'} "
        "(it declares: other)"
    )


def test_bad_ratelimit_file_is_a_mesh_error(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "ratelimit: {port: 18012, config: rl.yaml}",
        **{"rl.yaml": "domain: mesh\ndescriptors: [{key: a, rate_limit: {unit: sec}}]\n"},
    )
    message = plan_error(path)
    assert message.startswith(f"{path}: ratelimit.config: {tmp_path / 'rl.yaml'}: descriptors[0]")


def test_status_port_is_reserved(tmp_path: Path) -> None:
    path = write(tmp_path, "extproc: {port: 18001}")
    assert plan_error(path, reserved={18001: "the control plane's status endpoint"}) == (
        f"{path}: extproc.port: port 18001 is the control plane's status endpoint"
    )


def test_not_embedded_is_only_remote(tmp_path: Path) -> None:
    path = write(tmp_path, "extproc: {port: 18011, embedded: false, host: 10.1.2.3}")
    p = plan(load_mesh(path), mesh_path=path)
    assert not p.embedded and p.remote == {"extproc": "10.1.2.3:18011"}
    assert route_chains(load_mesh(path)).chains["web"].fail_open is False


async def _process(port: int, chain: str) -> pb.ProcessingResponse:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.ExternalProcessorStub(channel)
        call = stub.Process(metadata=(("x-legation-chain", chain),))
        request = pb.ProcessingRequest()
        request.request_headers.headers.headers.add(key=":path", raw_value=b"/")
        request.request_headers.end_of_stream = True
        await call.write(request)
        answer = await call.read()
        await call.done_writing()
        return answer  # type: ignore[no-any-return]


def _set_headers(answer: pb.ProcessingResponse) -> dict[str, str]:
    mutation = answer.request_headers.response.header_mutation
    return {h.header.key: h.header.raw_value.decode() for h in mutation.set_headers}


def test_extproc_chains_swap_in_place_and_stop_frees_the_port(tmp_path: Path) -> None:
    async def scenario() -> None:
        port = free_port()
        services = EmbeddedServices(on_event=lambda line: None)
        first = write(tmp_path, f"extproc: {{port: {port}}}", tag="one")
        await services.apply(plan(load_mesh(first), mesh_path=first))
        server = services.running["extproc"].server
        assert _set_headers(await _process(port, "web")) == {"x-tag": "one"}
        second = write(tmp_path, f"extproc: {{port: {port}}}", tag="two")
        assert await services.apply(plan(load_mesh(second), mesh_path=second)) == []
        assert services.running["extproc"].server is server  # swapped, not restarted
        assert _set_headers(await _process(port, "web")) == {"x-tag": "two"}
        await services.stop()
        assert not services.running
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is fine
            s.bind(("127.0.0.1", port))  # nobody listens there any more
            s.listen()

    asyncio.run(scenario())


def test_a_taken_port_is_reported_not_raised(tmp_path: Path) -> None:
    async def scenario() -> list[str]:
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            path = write(tmp_path, f"extproc: {{port: {port}}}")
            services = EmbeddedServices(on_event=lambda line: None)
            failures = await services.apply(plan(load_mesh(path), mesh_path=path))
            assert "extproc" not in services.running
            return failures

    (failure,) = asyncio.run(scenario())
    assert failure.startswith("cannot start the embedded extproc service on 127.0.0.1:")


def test_route_chains_follow_the_routes(tmp_path: Path) -> None:
    path = write(tmp_path, "extproc: {port: 18011, failure_mode: open}")
    chains = route_chains(load_mesh(path))
    assert list(chains.chains) == ["web"]
    assert chains.chains["web"].fail_open is True


def test_relative_paths_in_authz_yaml_follow_the_file(tmp_path: Path) -> None:
    (tmp_path / "conf").mkdir()
    (tmp_path / "policies").mkdir()
    (tmp_path / "conf" / "jwks.json").write_text('{"keys": []}')
    path = write(
        tmp_path,
        "extauthz: {port: 18010, config: conf/authz.yaml}",
        **{
            "conf/authz.yaml": (
                "checks:\n"
                "  rego: {type: rego, options: {policy_dir: ../policies}}\n"
                "  jwt: {type: jwt, options: {providers: [{name: p, issuer: i,"
                " jwks_file: jwks.json, audiences: any}]}}\n"
                "default_checks: [jwt, rego]\ndecision_log: decisions.jsonl\n"
            ),
        },
    )
    config = plan(load_mesh(path), mesh_path=path).embedded["extauthz"].live["config"]
    policy_dir = config["checks"]["rego"]["options"]["policy_dir"]
    assert policy_dir == str((tmp_path / "policies").resolve())
    provider = config["checks"]["jwt"]["options"]["providers"][0]
    assert provider["jwks_file"] == str((tmp_path / "conf" / "jwks.json").resolve())
    assert config["decision_log"] == str((tmp_path / "conf" / "decisions.jsonl").resolve())
