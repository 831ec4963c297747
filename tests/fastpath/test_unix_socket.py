"""The HTTP call-out on a Unix socket (``extauthz.http_socket``): how the socket file is made
(mode, a stale file replaced, anything else refused, removed only while it is ours), the server
answering on it, a service's worker on ``<path>.<i>``, and the Envoy cluster of pipes."""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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


@contextmanager
def serving(path: str) -> Iterator[_unix.Bound]:
    bound = _unix.bind(path)
    try:
        yield bound
    finally:
        bound.sock.close()
        _unix.release(bound)


def in_the_window(monkeypatch: pytest.MonkeyPatch, action: Callable[[str], None]) -> None:
    """Have the next :func:`_unix.bind` run ``action(path)`` once the socket is bound, before
    its mode is set and it listens."""
    chmod = os.chmod

    def spy(target: str, mode: int) -> None:
        action(target)
        chmod(target, mode)

    monkeypatch.setattr(_unix.os, "chmod", spy)


def connects(path: str) -> bool:
    with socket.socket(socket.AF_UNIX) as client:
        try:
            client.connect(path)
        except OSError:
            return False
        return True


def test_the_socket_file_is_0660_and_accepts(tmp_path: Path) -> None:
    path = short(tmp_path)
    with serving(path):
        assert stat.S_ISSOCK(os.lstat(path).st_mode)
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o660
        assert connects(path)
    assert not os.path.exists(path)


def test_nobody_connects_before_the_mode_is_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = short(tmp_path)
    seen: list[bool] = []
    in_the_window(monkeypatch, lambda target: seen.append(connects(target)))
    with serving(path):
        assert seen == [False]  # bound, not yet listening: refused


def test_a_stale_socket_file_is_replaced(tmp_path: Path) -> None:
    path = short(tmp_path)
    old = _unix.bind(path)
    old.sock.close()
    os.close(old.lock)  # a server gone (its lock dropped with it) without removing its file
    assert os.path.exists(path)
    with serving(path):
        assert connects(path)


def test_a_second_server_is_refused_even_before_the_first_listens(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = short(tmp_path)
    second: list[BaseException] = []

    def race(target: str) -> None:
        try:
            _unix.bind(target)
        except OSError as err:
            second.append(err)

    in_the_window(monkeypatch, race)
    with serving(path):
        monkeypatch.undo()
        (err,) = second
        assert isinstance(err, OSError) and err.errno == errno.EADDRINUSE
        assert connects(path)  # the first's file is still there, and it listens
        with pytest.raises(OSError) as info:
            _unix.bind(path)  # and later too
        assert info.value.errno == errno.EADDRINUSE


def test_a_socket_something_else_listens_on_is_refused_and_left_alone(tmp_path: Path) -> None:
    path = short(tmp_path)
    with socket.socket(socket.AF_UNIX) as other:  # not Legation's: no lock
        other.bind(path)
        other.listen()
        with pytest.raises(OSError) as info:
            _unix.bind(path)
        assert info.value.errno == errno.EADDRINUSE
        assert connects(path)


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
    assert not os.path.lexists(f"{path}.lock")  # refused before a lock file is made


def test_a_symlink_planted_as_the_lock_is_never_followed(tmp_path: Path) -> None:
    path = short(tmp_path)
    target = tmp_path / "precious"
    target.write_text("keep")
    os.symlink(target, f"{path}.lock")
    with pytest.raises(OSError):
        _unix.bind(path)
    assert target.read_text() == "keep" and not os.path.exists(path)


@pytest.mark.parametrize("mode", [0o757, 0o1777, 0o1757])
def test_a_socket_directory_others_may_write_is_refused_even_sticky(
    tmp_path: Path, mode: int
) -> None:
    folder = tmp_path / "shared"
    folder.mkdir()
    folder.chmod(mode)  # sticky: others cannot rename the socket, but can squat its path
    with pytest.raises(OSError) as info:
        _unix.bind(str(folder / "a.sock"))
    assert info.value.errno == errno.EPERM
    assert not os.path.lexists(folder / "a.sock")


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a folder to another group needs root")
def test_a_directory_another_group_may_write_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "group"
    folder.mkdir()
    folder.chmod(0o770)
    os.chown(folder, -1, 12345)  # no such group here: not this user's own
    with pytest.raises(OSError) as info:
        _unix.bind(str(folder / "a.sock"))
    assert info.value.errno == errno.EPERM


def another_group() -> int:
    """An existing group other than this user's primary one, preferring one with no listed
    member that is nobody's primary group (tty, staff, ... on Debian): still nobody's own."""
    import grp
    import pwd

    primary = pwd.getpwuid(os.geteuid()).pw_gid
    someones = {p.pw_gid for p in pwd.getpwall()}
    others = sorted(
        (len(g.gr_mem) + (g.gr_gid in someones), g.gr_gid)
        for g in grp.getgrall()
        if g.gr_gid != primary
    )
    if not others:
        pytest.skip("no other group here")
    return others[0][1]


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a folder to another group needs root")
@pytest.mark.parametrize("where", ["own", "ancestor"])
def test_a_real_group_not_this_users_own_may_not_write(tmp_path: Path, where: str) -> None:
    shared = tmp_path / "shared"  # as Debian's /var/local: root:staff 2775
    (shared / "inner").mkdir(parents=True)
    shared.chmod(0o2775)
    os.chown(shared, 0, another_group())
    folder = shared if where == "own" else shared / "inner"
    with pytest.raises(OSError) as info:
        _unix.bind(str(folder / "a.sock"))
    assert info.value.errno == errno.EPERM and info.value.filename == str(shared)


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a folder to another group needs root")
def test_the_socket_has_the_services_group_even_in_a_setgid_directory(tmp_path: Path) -> None:
    folder = tmp_path / "setgid"
    folder.mkdir()
    folder.chmod(0o2755)  # not group-writable, but its files would take its group
    os.chown(folder, 0, another_group())
    with serving(str(folder / "a.sock")) as bound:
        assert os.lstat(bound.path).st_gid == os.getegid()


def test_a_directory_swapped_for_a_symlink_after_it_is_made_is_never_chmodded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "precious"
    target.write_text("keep")
    target.chmod(0o600)
    folder = tmp_path / "run"
    mkdir = os.mkdir

    def swap(path: str, mode: int = 0o777) -> None:  # made, then replaced by a symlink
        mkdir(path, mode)
        os.rmdir(path)
        os.symlink(target, path)

    monkeypatch.setattr(_unix.os, "mkdir", swap)
    with pytest.raises(OSError):
        _unix.bind(str(folder / "a.sock"))
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o600


def test_a_directory_only_this_users_own_group_may_write_is_accepted(tmp_path: Path) -> None:
    if not _unix._own_group(os.getegid()):
        pytest.skip("this user's group has other members here")
    folder = tmp_path / "private-group"
    folder.mkdir()
    folder.chmod(0o770)  # umask 002 with a group of one's own (Debian, Fedora)
    os.chown(folder, -1, os.getegid())
    with serving(str(folder / "a.sock")) as bound:
        assert connects(bound.path)


def test_an_ancestor_others_may_write_is_refused_unless_sticky(tmp_path: Path) -> None:
    outer = tmp_path / "outer"
    (outer / "inner").mkdir(parents=True)
    outer.chmod(0o777)  # anyone could rename inner and put their own in its place
    path = str(outer / "inner" / "a.sock")
    with pytest.raises(OSError) as info:
        _unix.bind(path)
    assert info.value.errno == errno.EPERM and info.value.filename == str(outer)
    outer.chmod(0o1777)  # as /tmp: no one else may rename inner
    with serving(path):
        assert connects(path)


def test_a_symlinked_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "link")
    with pytest.raises(OSError) as info:
        _unix.bind(str(tmp_path / "link" / "a.sock"))
    assert info.value.errno == errno.EPERM
    assert not os.path.lexists(tmp_path / "real" / "a.sock")


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a folder to another user needs root")
def test_a_directory_another_user_owns_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "theirs"
    folder.mkdir(mode=0o755)
    os.chown(folder, 12345, 12345)
    with pytest.raises(OSError) as info:
        _unix.bind(str(folder / "a.sock"))
    assert info.value.errno == errno.EPERM


def test_a_missing_directory_is_made_0755_whatever_the_umask(tmp_path: Path) -> None:
    path = str(tmp_path / "run" / "a.sock")
    old = os.umask(0o077)
    try:
        with serving(path):
            made = os.stat(tmp_path / "run")
            assert stat.S_IMODE(made.st_mode) == 0o755 and made.st_uid == os.geteuid()
            assert connects(path)
    finally:
        os.umask(old)


def test_a_server_stopped_in_this_process_binds_again(tmp_path: Path) -> None:
    path = short(tmp_path)
    with serving(path):
        pass
    with serving(path):  # its lock was dropped with it
        assert connects(path)


def test_a_refused_bind_drops_the_lock_it_took(tmp_path: Path) -> None:
    path = short(tmp_path)
    with socket.socket(socket.AF_UNIX) as other:  # not Legation's: refused under the lock
        other.bind(path)
        other.listen()
        with pytest.raises(OSError):
            _unix.bind(path)
    with serving(path):  # the other is gone: its file is stale, and the lock is free
        assert connects(path)


@pytest.mark.parametrize(
    "path", ["relative.sock", "/" + "d" * 107, "/run/a\0b", "/run/dir/", "/run/.", "/run/..", "/"]
)
def test_a_path_the_kernel_cannot_take_is_refused(path: str) -> None:
    with pytest.raises(OSError) as info:
        _unix.bind(path)
    assert info.value.errno == errno.EINVAL


def test_the_longest_path_a_mesh_may_name_binds_with_a_workers_suffix(tmp_path: Path) -> None:
    stem = str(tmp_path) + "/"
    path = stem + "s" * (_unix.MAX_PATH - len(os.fsencode(stem)))
    assert len(os.fsencode(path)) == _unix.MAX_PATH
    assert _unix.check_path(path + "x") is not None  # the mesh may not name a longer one
    for worker in (path, f"{path}.63", f"{path}.999999"):
        with serving(worker):
            assert connects(worker)


def test_release_leaves_a_file_another_server_bound_since(tmp_path: Path) -> None:
    path = short(tmp_path)
    first = _unix.bind(path)
    first.sock.close()
    os.unlink(path)
    with socket.socket(socket.AF_UNIX) as other:  # another server's, at the same path
        other.bind(path)
        _unix.release(first)
        assert os.path.exists(path)
    assert first.lock == -1


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
