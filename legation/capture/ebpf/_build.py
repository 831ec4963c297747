"""Build the BPF object from its C source with clang, once per source, into a cache directory.

The object is never shipped or hand-assembled: ``clang -target bpf -O2 -g`` compiles
``sockmap.bpf.c`` (against libbpf-dev's headers) at first use. The cache key is the SHA-256 of the
source and the flags, so an edited source is rebuilt and an unchanged one is reused; the object is
written to a temporary name and renamed, so a reader never sees half an object.

``legation up --ebpf`` runs as root and loads what it finds in the cache into the kernel, so the
cache is trusted only when the object and every directory from the cache root's parent down are
owned by the user building (the effective uid), writable by nobody else and not symlinks;
anything else is refused with the path and the reason, never loaded. New directories are 0700.
Those checks go by path, so the object itself is then read through one descriptor checked with
``fstat`` (:func:`read_trusted`) and loaded from a private copy: renaming or swapping a directory
above the cache after the checks gets a file the user did not write refused, not loaded.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

from legation.capture.errors import CaptureError

SOURCE = Path(__file__).resolve().parent / "sockmap.bpf.c"
_FLAGS = ("-target", "bpf", "-O2", "-g", "-Wall", "-Werror")


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/legation/bpf`` (``~/.cache/legation/bpf`` by default)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "legation" / "bpf"


def _include_flags() -> list[str]:
    # <linux/bpf.h> includes <asm/types.h>, which Debian keeps under the multiarch directory
    multiarch = Path("/usr/include", f"{platform.machine()}-linux-gnu")
    return ["-I", str(multiarch)] if multiarch.is_dir() else []


def build_object(source: Path = SOURCE, *, cache: Path | None = None) -> Path:
    """The compiled object for ``source``: from the cache when built before, else built now."""
    clang = shutil.which("clang")
    if clang is None:
        raise CaptureError(
            "--ebpf: clang not found (Debian package clang)", code="capture_unavailable"
        )
    text = source.read_bytes()
    flags = [*_FLAGS, *_include_flags()]
    key = hashlib.sha256(text + "\0".join(flags).encode()).hexdigest()[:24]
    root = cache or cache_dir()
    target = root / key / source.name.replace(".c", ".o")
    for level in [*reversed(target.parent.parents), target.parent]:  # 0700 whatever the umask
        if not level.exists():
            level.mkdir(mode=0o700)
    _check_trusted(root.parent, root, target.parent)
    if target.exists():
        _check_trusted(target)
        return target
    fd, partial = tempfile.mkstemp(dir=target.parent, suffix=".o.partial")
    os.close(fd)
    command = [clang, *flags, "-c", str(source), "-o", partial]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
        if done.returncode != 0:
            raise CaptureError(f"--ebpf: {' '.join(command)} failed: {done.stderr.strip()}")
        os.chmod(partial, 0o600)  # clang creates it under the caller's umask
        os.replace(partial, target)
    finally:
        Path(partial).unlink(missing_ok=True)
    return target


def read_trusted(path: Path) -> bytes:
    """The bytes of the object at ``path``, read through one descriptor opened without following
    a final symlink and checked by ``fstat`` (a regular file of the effective uid, writable by
    nobody else): whatever is renamed or swapped around the path after the checks above, what is
    read is a file this user wrote. The loader gets a private copy of these bytes, never the
    cache path."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as err:
        raise CaptureError(f"--ebpf: cannot open the BPF object {path}: {err}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
            raise CaptureError(
                f"--ebpf: the BPF object {path} is not a file only this user wrote "
                f"(uid {st.st_uid}, mode {stat.filemode(st.st_mode)}); not loaded",
                code="capture_unavailable",
            )
        return f.read()


def _check_trusted(*paths: Path) -> None:
    """Raise CaptureError unless each path is ours: owned by the effective uid, not a symlink,
    not writable by group or others (a planted object would be loaded into the kernel)."""
    uid = os.geteuid()
    for path in paths:
        st = os.lstat(path)
        why = (
            "is a symlink"
            if stat.S_ISLNK(st.st_mode)
            else f"is owned by uid {st.st_uid}, not {uid}"
            if st.st_uid != uid
            else "is writable by group or others"
            if st.st_mode & 0o022
            else None
        )
        if why is not None:
            raise CaptureError(
                f"--ebpf: the BPF object cache {path} {why}; remove it or set XDG_CACHE_HOME "
                "to a directory only this user can write",
                code="capture_unavailable",
            )
