"""Private files: keys and credentials written so that no one else can read them, ever.

A file is written to a temporary name created with ``O_CREAT | O_EXCL | O_NOFOLLOW`` (so a planted
file or symlink at that name is never followed or reused) with its final mode, then renamed over
the target (readers see the old or the new file, never half of one). Directories are created 0700.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

from legation.certs.errors import CertError


def private_dir(path: Path) -> None:
    """Create ``path`` (and parents) 0700; an existing one is left as it is."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)


def write_private(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write ``data`` to ``path`` through an exclusive temporary file and an atomic rename."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(tmp, flags, mode)
    try:
        with os.fdopen(fd, "wb") as out:
            os.fchmod(out.fileno(), mode)  # the umask never widens it, but may have narrowed it
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def check_private_key_file(path: Path) -> None:
    """Refuse a key file that group or others can read or write (the file a symlink points to
    is what counts: secrets mounted by orchestrators are often symlinks)."""
    try:
        st = os.stat(path)
    except OSError as err:
        raise CertError(f"{path}: cannot read: {err.strerror or err}",
                        code="ca_unreadable") from None
    if st.st_mode & 0o077:
        raise CertError(
            f"{path}: the CA key is accessible to group or others (mode "
            f"{stat.S_IMODE(st.st_mode):04o}); run: chmod 600 {path}",
            code="ca_insecure",
        )
