"""Planning the request-path services of one mesh generation: validate, create nothing.

:func:`plan` reads every file the embedded services need (through each kind's
:meth:`~legation.services.base.Service.settings`) and checks what the routes ask of them (each
kind's ``references``, e.g. ``routes[3].authz`` against the policy packages that exist). Every
problem is a :class:`~legation.config.Problem` on the mesh file, naming the field and any other
file involved, so ``legation check``, ``legation up`` and a reload reject the same things with the
same words. :func:`watched_digest` fingerprints the files a plan depends on, so an edit to
``authz.yaml``, the rate-limit YAML or a policy directory is noticed without touching the mesh.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from legation.config import Mesh, MeshConfigError, Problem
from legation.config.tracing import Tracing, tracing_tls
from legation.services.base import Invalid, ServiceSpec
from legation.services.kinds import KINDS, blocks

__all__ = ["Plan", "config_files", "one_worker", "plan", "watched_digest"]


@dataclass(frozen=True)
class Plan:
    """The embedded services of one mesh generation, validated; ``remote`` are the addresses of
    the declared services that run elsewhere."""

    embedded: Mapping[str, ServiceSpec]
    remote: Mapping[str, str]
    tracing: Tracing | None = None
    """Where the services' spans go (the mesh's ``tracing`` block; None: no spans)."""
    tracing_tls: bool = False
    """Whether they go over mesh mTLS, each service with its own certificate."""

    @property
    def watched(self) -> tuple[Path, ...]:
        return tuple(p for spec in self.embedded.values() for p in spec.watched)


def plan(
    mesh: Mesh,
    *,
    mesh_path: str | Path,
    reserved: Mapping[int, str] | None = None,
    embedded: bool = True,
) -> Plan:
    """Validate what the mesh's services need; raise MeshConfigError naming file and field.
    ``reserved`` ports (e.g. the status endpoint's) cannot be used by an embedded service, nor
    by the embedded trace receiver.
    ``embedded=False``: the services run elsewhere whatever their blocks say (only the Envoy
    side is configured): nothing to plan or read."""
    if not embedded:
        return Plan(embedded={}, remote={}, tracing=mesh.tracing, tracing_tls=tracing_tls(mesh))
    source = str(mesh_path)
    mesh_dir = Path(mesh_path).resolve().parent
    reserved = reserved or {}
    problems: list[Problem] = []
    specs: dict[str, ServiceSpec] = {}
    remote: dict[str, str] = {}
    if mesh.tracing is not None and mesh.tracing.embedded:  # the receiver: in the control plane
        port = mesh.tracing.address()[1]
        if port in reserved:
            problems.append(Problem("tracing.port", f"port {port} is {reserved[port]}"))
    for kind in KINDS:
        block = kind.block_of(mesh)
        if block is None:
            continue
        if not block.embedded:
            remote[kind.name] = f"{block.host}:{block.port}"
            continue
        if block.port in reserved:
            problems.append(
                Problem(f"{kind.block}.port", f"port {block.port} is {reserved[block.port]}")
            )
            continue
        cls = kind.service_class()
        try:
            spec = cls.settings(mesh, mesh_dir)
        except Invalid as err:
            problems.append(Problem(f"{kind.block}.{err.field}", str(err)))
            continue
        problems += [Problem(path, message) for path, message in cls.references(mesh, spec)]
        tls = block.mesh_tls(mtls_enabled=mesh.mtls.enabled)
        specs[kind.name] = replace(spec, tls=tls, workers=block.worker_count())
    if problems:
        raise MeshConfigError(source, problems)
    return Plan(embedded=specs, remote=remote, tracing=mesh.tracing, tracing_tls=tracing_tls(mesh))


def one_worker(mesh: Mesh) -> Mesh:
    """``mesh`` with every service block at ``workers: 1``: what a control plane that runs the
    services in its own process (one server each) plans and translates (one endpoint each)."""
    update = {kind.block: block.model_copy(update={"workers": 1}) for kind, block in blocks(mesh)}
    return mesh.model_copy(update=update) if update else mesh


def watched_digest(paths: tuple[Path, ...]) -> str:
    """Changes when a watched file's bytes change, or a watched folder's policy or data files
    are added, removed or rewritten; a missing file is part of the digest too."""
    from legation.extauthz.policies import fingerprint

    h = hashlib.sha256()
    for path in paths:
        h.update(str(path).encode() + b"\0")
        try:
            if path.is_dir():
                h.update(fingerprint(path).encode())
            else:
                h.update(path.read_bytes())
        except OSError as err:
            h.update(f"unreadable: {err}".encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def config_files(mesh: Mesh, mesh_dir: Path) -> tuple[Path, ...]:
    """The service files the mesh names (watched even while they do not validate)."""
    out = []
    for _, block in blocks(mesh):
        config = getattr(block, "config", None)
        if block.embedded and config is not None:
            out.append(mesh_dir.resolve() / config)
    return tuple(out)
