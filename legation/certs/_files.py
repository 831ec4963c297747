"""Private files: keys and credentials written so that no one else can read them, ever.

A file is written to a temporary name created with ``O_CREAT | O_EXCL | O_NOFOLLOW`` (so a planted
file or symlink at that name is never followed or reused) with its final mode, then renamed over
the target (readers see the old or the new file, never half of one), or, for a file that must
never be replaced (a CA key), hard-linked to it (which fails if the target exists). Directories
are created 0700; an existing one is used only if this user owns it and no one else can write to
it (else anyone who can could swap the files in it).
"""

from __future__ import annotations

import fcntl
import os
import secrets
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from legation.certs.errors import CertError


def private_dir(path: Path) -> None:
    """Create ``path`` (and parents) 0700; an existing one must pass :func:`check_private_dir`."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    check_private_dir(path)


def check_private_dir(path: Path) -> None:
    """Refuse a directory owned by another user or writable by group or others."""
    try:
        st = os.stat(path)
    except OSError as err:
        raise CertError(
            f"{path}: cannot read: {err.strerror or err}", code="ca_unreadable"
        ) from None
    if st.st_uid != os.geteuid():
        raise CertError(
            f"{path}: owned by uid {st.st_uid}, not by this process (uid {os.geteuid()}); "
            f"keys and credentials live only in a directory of their own user's; run: "
            f"chown {os.geteuid()} {path}",
            code="ca_insecure",
        )
    if st.st_mode & 0o022:
        raise CertError(
            f"{path}: the directory is writable by group or others (mode "
            f"{stat.S_IMODE(st.st_mode):04o}), who could replace the keys in it; run: "
            f"chmod 700 {path}",
            code="ca_insecure",
        )


def _write_temporary(path: Path, data: bytes, mode: int) -> Path:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(tmp, flags, mode)
    try:
        with os.fdopen(fd, "wb") as out:
            os.fchmod(out.fileno(), mode)  # the umask never widens it, but may have narrowed it
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def write_private(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write ``data`` to ``path`` through an exclusive temporary file and an atomic rename."""
    tmp = _write_temporary(path, data, mode)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_new_private(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Like :func:`write_private`, but never replaces an existing ``path``: the complete
    temporary is hard-linked to it, which raises ``FileExistsError`` if it exists."""
    tmp = _write_temporary(path, data, mode)
    try:
        os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created 0600, never through a symlink) for the
    duration; other processes (and other open descriptions in this one) wait for it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def check_private_key_file(path: Path) -> None:
    """Refuse a key file that group or others can read or write, or that another user owns (the
    file a symlink points to is what counts: secrets mounted by orchestrators are often
    symlinks)."""
    try:
        st = os.stat(path)
    except OSError as err:
        raise CertError(
            f"{path}: cannot read: {err.strerror or err}", code="ca_unreadable"
        ) from None
    if st.st_mode & 0o077:
        raise CertError(
            f"{path}: the CA key is accessible to group or others (mode "
            f"{stat.S_IMODE(st.st_mode):04o}); run: chmod 600 {path}",
            code="ca_insecure",
        )
    if st.st_uid != os.geteuid():
        raise CertError(
            f"{path}: the CA key is owned by uid {st.st_uid}, not by this process (uid "
            f"{os.geteuid()}); run: chown {os.geteuid()} {path}",
            code="ca_insecure",
        )
