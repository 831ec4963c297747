"""Listening Unix-domain sockets, for a service its Envoys reach on the same host.

On one host a Unix socket is a cheaper path than loopback TCP (bench/README, "the HTTP call-out
over a Unix socket"), and a narrower one: only processes the socket file's mode lets in can
connect, where any local process can connect to a loopback port.

:func:`bind` makes the socket:

* Its directory must be one no one else can write: a real directory (no symlink) owned by this
  user or root, not writable by group or others (group-writable only when the group is this
  user's private group: its primary group, named after it, with no other member). Every
  directory above it must be as safe, except that a sticky one (``/tmp``) may be world-writable,
  since no one else can rename what is in it. Otherwise another user could put their own socket,
  or a directory of theirs, at the path, and Envoy would call whatever answers there. The chain
  above is checked before a missing socket directory is made (mode 0755, set on the directory
  made, never through a symlink).
* A lock (``flock`` on ``<path>.lock``, never following a symlink) is held while the server
  runs, so two servers never take the same path: the second is refused (EADDRINUSE), and a
  socket file found under a free lock is a stopped server's, replaced. What is at the path and
  is not a socket (a file, a directory, a symlink) is refused, never removed; so is a socket
  something else (not under the lock) still accepts on.
* Mode ``0660`` and the service's own group (not a setgid directory's) are set before the
  socket listens, so no one connects while it is wider.

:func:`release` removes the socket file (only while it is still the one bound) and drops the lock.
"""

from __future__ import annotations

import errno
import fcntl
import grp
import os
import pwd
import socket
import stat
from dataclasses import dataclass

MAX_PATH = 100
"""Longest path a mesh may name, in bytes: the kernel's ``sun_path`` holds :data:`KERNEL_MAX`,
and a service's workers add ``.N`` to it."""
KERNEL_MAX = 107
MODE = 0o660


@dataclass
class Bound:
    """A listening socket at ``path``, the file as bound (``identity``) and the held lock."""

    path: str
    sock: socket.socket
    identity: os.stat_result
    lock: int


def check_path(path: str, limit: int = MAX_PATH) -> str | None:
    """Why ``path`` cannot name a service's socket (longer than ``limit`` bytes, ...), or None."""
    if not os.path.isabs(path):
        return "must be an absolute path (Envoy and the service resolve it alike)"
    if "\0" in path:
        return "has a NUL character"
    if os.path.basename(path) in ("", ".", ".."):
        return "names a directory"
    if len(os.fsencode(path)) > limit:
        return f"is longer than {limit} bytes (a Unix socket's path limit)"
    return None


def bind(path: str, *, mode: int = MODE, backlog: int = 1024) -> Bound:
    """A non-blocking AF_UNIX stream socket listening at ``path`` with ``mode`` (see the module
    docstring). OSError when the path is refused, in use, or cannot be bound."""
    why = check_path(path, KERNEL_MAX)
    if why is not None:
        raise OSError(errno.EINVAL, f"socket path {why}", path)
    _check_directory(os.path.dirname(path))
    _socket_at(path)  # anything else there: refused before a lock file is made beside it
    lock = _lock(path)
    try:
        _clear_stale(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
            try:  # until listen() every connect is refused: mode and group are set first
                os.chown(path, -1, os.getegid(), follow_symlinks=False)  # not a setgid dir's
                os.chmod(path, mode)
                identity = os.lstat(path)
                sock.listen(backlog)
                sock.setblocking(False)
            except BaseException:
                os.unlink(path)  # ours: the directory is safe and the lock held
                raise
        except BaseException:
            sock.close()
            raise
    except BaseException:
        os.close(lock)
        raise
    return Bound(path, sock, identity, lock)


def release(bound: Bound) -> None:
    """Remove the socket file if it is still the one bound, and drop the lock (the socket
    itself is closed by whoever serves it)."""
    try:
        _unlink(bound.path, bound.identity)
    finally:
        if bound.lock >= 0:
            os.close(bound.lock)
            bound.lock = -1


def _unlink(path: str, bound: os.stat_result) -> None:
    try:
        now = os.lstat(path)
    except FileNotFoundError:
        return
    # the inode number alone is not enough: a file removed and bound again may get it back
    if (now.st_dev, now.st_ino, now.st_ctime_ns) == (bound.st_dev, bound.st_ino, bound.st_ctime_ns):
        os.unlink(path)


def _check_directory(folder: str) -> None:
    _check_chain(os.path.dirname(folder), own=False)  # before anything is made in it
    try:
        os.mkdir(folder, 0o755)
    except FileExistsError:
        pass
    except OSError as err:
        raise OSError(err.errno, f"cannot create its directory: {err.strerror}", folder) from None
    else:  # 0755 whatever the umask, on the directory made (never through a symlink)
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            os.fchmod(fd, 0o755)
        finally:
            os.close(fd)
    _check_chain(folder, own=True)


def _check_chain(folder: str, *, own: bool) -> None:
    """``folder`` and every directory above it (``own``: ``folder`` is the socket's own, which
    may not be others-writable even when sticky)."""
    here = folder
    while True:
        found = os.lstat(here)
        if stat.S_ISLNK(found.st_mode):
            raise OSError(errno.EPERM, "is a symlink: name the socket by its real path", here)
        if not stat.S_ISDIR(found.st_mode):
            raise OSError(errno.ENOTDIR, "is not a directory", here)
        why = _unsafe(found, sticky_ok=not own)
        if why is not None:
            raise OSError(errno.EPERM, f"{why}, so another user could replace the socket", here)
        parent = os.path.dirname(here)
        if parent == here:
            return
        here, own = parent, False


def _unsafe(found: os.stat_result, *, sticky_ok: bool) -> str | None:
    if found.st_uid not in (os.geteuid(), 0):
        return "is another user's"
    sticky = sticky_ok and bool(found.st_mode & stat.S_ISVTX)
    if found.st_mode & 0o002 and not sticky:
        return "is writable by others"
    if found.st_mode & 0o020 and not sticky and not _own_group(found.st_gid):
        return "is writable by its group"
    return None


def _own_group(gid: int) -> bool:
    """Whether ``gid`` is this user's own: its primary group, named after it, with no other
    member and nobody else's primary group (a user private group, as umask 002 assumes)."""
    uid = os.geteuid()
    try:
        me = pwd.getpwuid(uid)
        group = grp.getgrgid(gid)
    except KeyError:
        return False
    if me.pw_gid != gid or group.gr_name != me.pw_name:
        return False
    if any(m != me.pw_name for m in group.gr_mem):
        return False
    return all(p.pw_uid == uid for p in pwd.getpwall() if p.pw_gid == gid)


def _socket_at(path: str) -> os.stat_result | None:
    """The socket file at ``path`` (None: nothing there); OSError for anything else."""
    try:
        found = os.lstat(path)
    except FileNotFoundError:
        return None
    if not stat.S_ISSOCK(found.st_mode):
        raise OSError(errno.EEXIST, "exists and is not a socket (not removed)", path)
    return found


def _lock(path: str) -> int:
    name = f"{path}.lock"
    flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
    fd = os.open(name, flags, 0o600)  # a symlink planted there: ELOOP, never followed
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise OSError(errno.EADDRINUSE, "another server holds this socket", path) from None
    except BaseException:
        os.close(fd)
        raise
    return fd


def _clear_stale(path: str) -> None:
    found = _socket_at(path)  # again, under the lock
    if found is None:
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)
    try:
        probe.connect(path)
    except ConnectionRefusedError:  # nothing accepts there: a stopped server's file
        _unlink(path, found)
        return
    except BlockingIOError:  # accepting, its backlog full: in use
        pass
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, "something else listens on this socket", path)
