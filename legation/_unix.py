"""Listening Unix-domain sockets, for a service its Envoys reach on the same host.

On one host a Unix socket is a cheaper path than loopback TCP (bench/README, "the HTTP call-out
over a Unix socket"), and a narrower one: only processes the socket file's mode lets in can
connect, where any local process can connect to a loopback port.

:func:`bind` makes the socket: mode ``0660`` (the service's user and group), set *before* the
socket listens, so no one connects while it is wider. A socket file left by a server that is
gone (nothing accepts on it) is replaced; a path that is in use, or is anything but a socket (a
file, a directory, a symlink), is refused, never removed. :func:`unlink` removes the socket at
shutdown only while the path is still the one this process bound.
"""

from __future__ import annotations

import errno
import os
import socket
import stat

MAX_PATH = 100
"""Longest path accepted, in bytes (the kernel's ``sun_path`` holds 107; a service's workers add
``.N`` to it)."""
MODE = 0o660


def check_path(path: str) -> str | None:
    """Why ``path`` cannot name a service's socket, or None."""
    if not os.path.isabs(path):
        return "must be an absolute path (Envoy and the service resolve it alike)"
    if "\0" in path:
        return "has a NUL character"
    if len(os.fsencode(path)) > MAX_PATH:
        return f"is longer than {MAX_PATH} bytes (a Unix socket's path limit)"
    return None


def bind(path: str, *, mode: int = MODE, backlog: int = 1024) -> socket.socket:
    """A non-blocking AF_UNIX stream socket listening at ``path`` with ``mode``. OSError when
    the path is in use, is not a socket, or cannot be bound (its message names the path)."""
    why = check_path(path)
    if why is not None:
        raise OSError(errno.EINVAL, f"socket path {why}", path)
    _clear_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    bound = False
    try:
        sock.bind(path)
        bound = True
        os.chmod(path, mode)  # before listen(): until then every connect is refused
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        if bound:
            unlink(path, os.lstat(path))
        raise
    return sock


def identity(path: str) -> os.stat_result:
    """What :func:`unlink` compares: the socket file as bound (call right after binding)."""
    return os.lstat(path)


def unlink(path: str, bound: os.stat_result) -> None:
    """Remove the socket file at ``path`` if it is still the one ``bound`` describes (another
    server may have replaced it since)."""
    try:
        now = os.lstat(path)
    except FileNotFoundError:
        return
    if _same(now, bound):
        os.unlink(path)


def _same(a: os.stat_result, b: os.stat_result) -> bool:
    # the inode number alone is not enough: a file removed and bound again may get it back
    return (a.st_dev, a.st_ino, a.st_ctime_ns) == (b.st_dev, b.st_ino, b.st_ctime_ns)


def _clear_stale(path: str) -> None:
    try:
        found = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(found.st_mode):
        raise OSError(errno.EEXIST, "exists and is not a socket (not removed)", path)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except ConnectionRefusedError:  # nothing accepts there: a stopped server's file
        unlink(path, found)
        return
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, "a server already listens on this socket", path)
