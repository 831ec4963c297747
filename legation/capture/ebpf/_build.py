"""Build the BPF object from its C source with clang, once per source, into a cache directory.

The object is never shipped or hand-assembled: ``clang -target bpf -O2 -g`` compiles
``sockmap.bpf.c`` (against libbpf-dev's headers) at first use. The cache key is the SHA-256 of the
source and the flags, so an edited source is rebuilt and an unchanged one is reused; the object is
written to a temporary name and renamed, so a reader never sees half an object.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
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
    target = (cache or cache_dir()) / key / source.name.replace(".c", ".o")
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(dir=target.parent, suffix=".o.partial")
    os.close(fd)
    command = [clang, *flags, "-c", str(source), "-o", partial]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
        if done.returncode != 0:
            raise CaptureError(f"--ebpf: {' '.join(command)} failed: {done.stderr.strip()}")
        os.replace(partial, target)
    finally:
        Path(partial).unlink(missing_ok=True)
    return target
