"""The HTTP call-out on a Unix socket (``extauthz.http_socket``): how the socket file is made
(mode, a stale file replaced, anything else refused, removed only while it is ours), the server
answering on it, a service's worker on ``<path>.<i>``, and the Envoy cluster of pipes."""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import stat
from pathlib import Path

import pytest
import yaml

from legation import _unix
from legation.config import load_mesh
from legation.fastpath.server import Settings, start_server
from legation.services.extauthz import AuthzService
from legation.translate import translate
from legation.xds.types import ResourceType
from tests.conftest import distinct_ports
from tests.translate.test_mesh import message

CHECK = b"GET /legation/check/x HTTP/1.1\r\nhost: a\r\ncontent-length: 0\r\n\r\n"


def short(tmp_path: Path, name: str = "a.sock") -> str:
    """A socket path under the test's folder (pytest's folders fit the 100-byte limit)."""
    path = str(tmp_path / name)
    assert _unix.check_path(path) is None, path
    return path


def ask(path: str, request: bytes = CHECK) -> bytes:
    with socket.socket(socket.AF_UNIX) as conn:
        conn.settimeout(5)
        conn.connect(path)
        conn.sendall(request)
        return conn.recv(4096)


def test_the_socket_file_is_0660_and_accepts(tmp_path: Path) -> None:
    path = short(tmp_path)
    sock = _unix.bind(path)
    try:
        assert stat.S_ISSOCK(os.lstat(path).st_mode)
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o660
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(path)
    finally:
        sock.close()


def test_a_stale_socket_file_is_replaced(tmp_path: Path) -> None:
    path = short(tmp_path)
    old = _unix.bind(path)
    old.close()  # a server gone without removing its file: nothing accepts there
    assert os.path.exists(path)
    new = _unix.bind(path)
    try:
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(path)
    finally:
        new.close()


def test_a_socket_in_use_is_refused_and_left_alone(tmp_path: Path) -> None:
    path = short(tmp_path)
    running = _unix.bind(path)
    try:
        with pytest.raises(OSError) as info:
            _unix.bind(path)
        assert info.value.errno == errno.EADDRINUSE
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(path)  # the running server still has it
    finally:
        running.close()


@pytest.mark.parametrize("kind", ["file", "directory", "symlink"])
def test_a_path_that_is_not_a_socket_is_refused_never_removed(tmp_path: Path, kind: str) -> None:
    path = short(tmp_path)
    target = tmp_path / "precious"
    target.write_text("keep")
    if kind == "file":
        Path(path).write_text("keep")
    elif kind == "directory":
        os.mkdir(path)
    else:
        os.symlink(target, path)
    with pytest.raises(OSError) as info:
        _unix.bind(path)
    assert info.value.errno == errno.EEXIST
    assert os.path.lexists(path) and target.read_text() == "keep"


@pytest.mark.parametrize("path", ["relative.sock", "/" + "d" * 120])
def test_a_path_the_kernel_cannot_take_is_refused(path: str) -> None:
    with pytest.raises(OSError) as info:
        _unix.bind(path)
    assert info.value.errno == errno.EINVAL


def test_unlink_leaves_a_file_another_server_bound_since(tmp_path: Path) -> None:
    path = short(tmp_path)
    first = _unix.bind(path)
    mine = _unix.identity(path)
    first.close()
    os.unlink(path)
    second = _unix.bind(path)  # another server's, at the same path
    try:
        _unix.unlink(path, mine)
        assert os.path.exists(path)
        _unix.unlink(path, _unix.identity(path))
        assert not os.path.exists(path)
    finally:
        second.close()


TABLE = {"checks": {"table": {"type": "table"}}, "default_checks": ["table"]}


async def test_the_callout_answers_on_its_socket_and_removes_it_on_close(
    tmp_path: Path, table_plugin: object
) -> None:
    path = short(tmp_path)
    server = await start_server(Settings(path=path, config=TABLE))
    try:
        assert (server.path, server.port) == (path, 0)
        assert (await asyncio.to_thread(ask, path)).startswith(b"HTTP/1.1 200 ")
        denied = CHECK.replace(b"/check/x", b"/check/token")
        assert (await asyncio.to_thread(ask, path, denied)).startswith(b"HTTP/1.1 401 ")
    finally:
        await server.close()
    assert not os.path.exists(path)


def mesh_file(tmp_path: Path, sock: str, workers: int) -> Path:
    ports = distinct_ports("authz", "xds", "gw", "admin")
    (tmp_path / "authz.yaml").write_text(yaml.safe_dump(TABLE))
    mesh = {
        "xds": {"port": ports["xds"]},
        "gateway": {"name": "gw", "port": ports["gw"], "admin_port": ports["admin"]},
        "extauthz": {
            "port": ports["authz"],
            "config": "authz.yaml",
            "protocol": "http",
            "http_socket": sock,
            "workers": workers,
        },
        "services": [{"name": "up", "port": 9080, "endpoints": [{"port": 9111}]}],
        "routes": [{"name": "r", "to": {"service": "up"}, "authz": "any"}],
    }
    path = tmp_path / "mesh.yaml"
    path.write_text(yaml.safe_dump(mesh))
    return path


def test_envoy_calls_each_worker_on_its_socket(tmp_path: Path, table_plugin: object) -> None:
    sock = short(tmp_path)
    mesh = load_mesh(mesh_file(tmp_path, sock, workers=3))
    out = translate(mesh, version="v1")
    node = next(iter(out))
    cluster = message(out[node], ResourceType.CLUSTER, "legation|extauthz-http")
    pipes = [
        lb.endpoint.address.pipe.path for lb in cluster.load_assignment.endpoints[0].lb_endpoints
    ]
    assert pipes == [sock, f"{sock}.1", f"{sock}.2"]


async def test_a_worker_listens_on_its_own_socket(tmp_path: Path, table_plugin: object) -> None:
    sock = short(tmp_path)
    spec = AuthzService.settings(load_mesh(mesh_file(tmp_path, sock, workers=2)), tmp_path)
    from dataclasses import replace

    service = AuthzService(replace(spec, workers=2, worker=1), tls=None)
    await service.start()
    try:
        assert service.status() == {"http_socket": f"{sock}.1"}
        answer = await asyncio.to_thread(ask, f"{sock}.1")
        assert answer.startswith(b"HTTP/1.1 200 ")
        assert not os.path.exists(sock)  # worker 0's, not this one's
    finally:
        await service.stop(0)
    assert not os.path.exists(f"{sock}.1")
