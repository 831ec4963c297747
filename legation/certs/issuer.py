"""Certificates for one mesh's proxies: the CA it configures, a current certificate per proxy,
and which of them are due for renewal. The control plane holds one :class:`MeshIssuer`.

:meth:`MeshIssuer.update` follows the mesh (on start and every reload): it opens the CA the mesh
names (once; again only if ``ca_dir``/``ca_cert``/``ca_key`` change), issues a certificate to each
proxy that has none or whose SPIFFE id changed, keeps the others (a reload that does not touch
identities pushes no SDS), and forgets proxies that left. :meth:`MeshIssuer.rotate` re-issues the
certificates past :data:`~legation.certs.workload.RENEW_AT` of their lifetime (or all, forced).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from envoy.extensions.transport_sockets.tls.v3 import secret_pb2

from legation.certs.ca import CERT_FILE, KEY_FILE, CertificateAuthority
from legation.certs.sds import proxy_secrets
from legation.certs.spiffe import spiffe_id
from legation.certs.workload import WorkloadCert
from legation.config.model import Mesh

DEFAULT_CA_DIR = Path(".legation") / "ca"


@dataclass(frozen=True, slots=True)
class CaLocation:
    """Where a mesh's CA is: PEM files it names, or a directory (generated there on first use).
    ``home`` is the directory the enrolment records live in (next to the CA)."""

    cert_path: Path
    key_path: Path
    generate: bool

    @property
    def home(self) -> Path:
        return self.cert_path.parent

    @property
    def nodes_dir(self) -> Path:
        """Default parent of the proxies' credential directories (``.legation/nodes``)."""
        return self.home.parent / "nodes"

    def open(self, trust_domain: str) -> CertificateAuthority:
        if self.generate:
            return CertificateAuthority.in_directory(self.home, trust_domain=trust_domain)
        return CertificateAuthority.load(self.cert_path, self.key_path)


def locate_ca(mesh: Mesh, *, mesh_dir: Path, default_ca_dir: Path = DEFAULT_CA_DIR
              ) -> CaLocation:
    """The CA ``mesh`` configures (``mtls.ca_cert``/``ca_key``, or ``mtls.ca_dir``, relative to
    ``mesh_dir``), else ``default_ca_dir``; whether or not the mesh turns mTLS on (the xDS
    channel always needs one)."""
    m = mesh.mtls
    if m.ca_cert is not None and m.ca_key is not None:
        return CaLocation(mesh_dir / m.ca_cert, mesh_dir / m.ca_key, generate=False)
    directory = mesh_dir / m.ca_dir if m.ca_dir else default_ca_dir
    return CaLocation(directory / CERT_FILE, directory / KEY_FILE, generate=True)


def proxy_identities(mesh: Mesh) -> dict[str, str]:
    """Node id -> SPIFFE id: a sidecar has its service's identity, the gateway its own name's."""
    m = mesh.mtls
    out = {}
    for proxy in mesh.proxies():
        if proxy.kind == "sidecar":
            name = proxy.service
        else:
            name = mesh.gateway.name if mesh.gateway is not None else None
        assert name is not None
        out[proxy.node_id] = spiffe_id(m.trust_domain, m.namespace, name)
    return out


class MeshIssuer:
    def __init__(
        self,
        *,
        mesh_dir: Path,
        default_ca_dir: Path = DEFAULT_CA_DIR,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        """``mesh_dir``: what relative CA paths are relative to. ``clock``: the current time."""
        self.mesh_dir = mesh_dir
        self.default_ca_dir = default_ca_dir
        self.clock = clock
        self.ca: CertificateAuthority | None = None
        self.certs: dict[str, WorkloadCert] = {}
        self._ca_key: CaLocation | None = None
        self._mesh: Mesh | None = None

    @property
    def enabled(self) -> bool:
        return self._mesh is not None and self._mesh.mtls.enabled

    def update(self, mesh: Mesh) -> None:
        """Follow ``mesh``; raises :class:`~legation.certs.errors.CertError` (and then changes
        nothing) when its CA cannot be opened."""
        if not mesh.mtls.enabled:
            self._mesh, self.certs = mesh, {}
            return
        ca = self._open_ca(mesh)
        wanted = proxy_identities(mesh)
        now = self.clock()
        certs = {}
        for node, sid in wanted.items():
            held = self.certs.get(node)
            fresh = held is not None and held.spiffe_id == sid and ca is self.ca
            certs[node] = held if fresh and held else ca.issue(sid, ttl=mesh.mtls.cert_ttl,
                                                                 now=now)
        self.ca, self.certs, self._mesh = ca, certs, mesh

    def rotate(self, *, force: bool = False) -> list[str]:
        """Re-issue the certificates due for renewal (all with ``force``); their node ids."""
        if not self.enabled or self.ca is None or self._mesh is None:
            return []
        now = self.clock()
        due = sorted(n for n, c in self.certs.items() if force or c.due(now))
        for node in due:
            self.certs[node] = self.ca.issue(
                self.certs[node].spiffe_id, ttl=self._mesh.mtls.cert_ttl, now=now
            )
        return due

    def next_renewal(self) -> datetime | None:
        return min((c.renew_at for c in self.certs.values()), default=None)

    def secrets(self) -> dict[str, list[secret_pb2.Secret]] | None:
        """Node id -> its SDS secrets; None when the mesh does not use mTLS."""
        if not self.enabled or self.ca is None:
            return None
        return {node: proxy_secrets(c, self.ca.root_pem) for node, c in self.certs.items()}

    def status(self) -> dict[str, Any] | None:
        """The root's fingerprint and expiry, and each proxy's certificate (never keys)."""
        if not self.enabled or self.ca is None:
            return None
        return {
            "ca": {"fingerprint_sha256": self.ca.fingerprint,
                   "not_after": self.ca.not_after.isoformat(), "source": self.ca.source},
            "proxies": {node: c.summary() for node, c in sorted(self.certs.items())},
        }

    def _open_ca(self, mesh: Mesh) -> CertificateAuthority:
        where = locate_ca(mesh, mesh_dir=self.mesh_dir, default_ca_dir=self.default_ca_dir)
        if self.ca is not None and where == self._ca_key:
            return self.ca
        ca = where.open(mesh.mtls.trust_domain)
        self._ca_key = where
        return ca
