"""Certificates for one mesh's proxies: the CA it configures, a current certificate per proxy,
and which of them are due for renewal. The control plane holds one :class:`MeshIssuer`.

:meth:`MeshIssuer.update` follows the mesh (on start and every reload): it opens the CA the mesh
names (once; again only if ``ca_dir``/``ca_cert``/``ca_key`` change), issues a certificate to each
proxy that has none or whose SPIFFE id changed, keeps the others (a reload that does not touch
identities pushes no SDS), and forgets proxies that left. :meth:`MeshIssuer.rotate` re-issues the
certificates past :data:`~legation.certs.workload.RENEW_AT` of their lifetime (or all, forced).

The embedded request-path services that serve mesh mTLS get a server certificate the same way
(``update(mesh, services=...)``, :meth:`MeshIssuer.rotate_services`): identity
``spiffe://<trust_domain>/ns/<namespace>/sa/legation-<kind>``, plus DNS/IP SANs for the service
name and its bind address so that ordinary gRPC clients can verify it too. The running services
read :meth:`MeshIssuer.service_tls` before each handshake, so a renewal needs no restart. The
embedded trace receiver is one more such service (kind ``tracing``), and a service certificate
is good for client auth too: the services export their spans to that receiver with it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.x509.oid import ExtendedKeyUsageOID
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2

from legation.certs.ca import CertificateAuthority
from legation.certs.errors import CertError
from legation.certs.locate import (
    DEFAULT_CA_DIR,
    CaLocation,
    _service_hosts,
    locate_ca,
    proxy_identities,
    service_identity,
)
from legation.certs.roots import Phase, Roots, advance, rotation_requested
from legation.certs.sds import proxy_secrets
from legation.certs.store import CertStore
from legation.certs.workload import WorkloadCert
from legation.config.model import Mesh
from legation.grpc_server import ServerTls

__all__ = [
    "DEFAULT_CA_DIR",
    "CaLocation",
    "MeshIssuer",
    "locate_ca",
    "proxy_identities",
    "service_identity",
]

_SERVICE_USAGES = (ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH)
"""A service serves its callers and is a client of the trace receiver."""


class MeshIssuer:
    def __init__(
        self,
        *,
        mesh_dir: Path,
        default_ca_dir: Path = DEFAULT_CA_DIR,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        persist: bool = False,
    ) -> None:
        """``mesh_dir``: what relative CA paths are relative to. ``clock``: the current time.
        ``persist``: keep the issued certificates beside a generated CA (``<CA dir>/issued``,
        :class:`~legation.certs.store.CertStore`) and re-use the valid ones after a restart."""
        self.mesh_dir = mesh_dir
        self.default_ca_dir = default_ca_dir
        self.clock = clock
        self.ca: CertificateAuthority | None = None  # the signing root
        self.roots: Roots | None = None  # the signing root and the trust bundle
        self.certs: dict[str, WorkloadCert] = {}
        self.service_certs: dict[str, WorkloadCert] = {}
        self._service_hosts: dict[str, tuple[str, ...]] = {}
        self._service_tls: dict[str, ServerTls] = {}
        self._ca_key: CaLocation | None = None
        self._mesh: Mesh | None = None
        self.persist = persist
        self._store: CertStore | None = None

    @property
    def enabled(self) -> bool:
        return self._mesh is not None and self._mesh.mtls.enabled

    def update(self, mesh: Mesh, *, services: Mapping[str, str] | None = None) -> None:
        """Follow ``mesh``; raises :class:`~legation.certs.errors.CertError` (and then changes
        nothing) when its CA cannot be opened. ``services``: kind -> bind host of the embedded
        request-path services that serve mesh mTLS (they get a server certificate each)."""
        if not mesh.mtls.enabled:
            self._mesh, self.certs = mesh, {}
            self.service_certs, self._service_hosts, self._service_tls = {}, {}, {}
            return
        roots = self._open_ca(mesh)
        ca = roots.signer
        wanted = proxy_identities(mesh)
        now = self.clock()
        certs = {}
        for node, sid in wanted.items():
            held = self.certs.get(node)
            fresh = held is not None and held.spiffe_id == sid and ca is self.ca
            if not fresh and self._store is not None:
                held = self._store.load(f"proxy-{node}", ca=ca, spiffe_id=sid, now=now)
                fresh = held is not None
            certs[node] = held if fresh and held else ca.issue(sid, ttl=mesh.mtls.cert_ttl, now=now)
        service_certs, hosts = {}, {}
        for kind, host in (services or {}).items():
            sid, hosts[kind] = service_identity(mesh, kind), _service_hosts(kind, host)
            held = self.service_certs.get(kind)
            fresh = (
                held is not None
                and held.spiffe_id == sid
                and ca is self.ca
                and self._service_hosts.get(kind) == hosts[kind]
            )
            if not fresh and self._store is not None:
                held = self._store.load(
                    f"service-{kind}",
                    ca=ca,
                    spiffe_id=sid,
                    now=now,
                    hosts=hosts[kind],
                    usages=_SERVICE_USAGES,
                )
                fresh = held is not None
            service_certs[kind] = (
                held if fresh and held else self._issue_service(ca, sid, hosts[kind], mesh, now)
            )
        tls = {kind: self._tls_for(kind, c, roots) for kind, c in service_certs.items()}
        self.ca, self.roots, self.certs, self._mesh = ca, roots, certs, mesh
        self.service_certs, self._service_hosts, self._service_tls = service_certs, hosts, tls
        self._keep()

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
        if due:
            self._keep()
        return due

    def rotate_services(self, *, force: bool = False) -> list[str]:
        """Re-issue the services' certificates due for renewal (all with ``force``); their kinds.
        The running services pick the new one up at their next handshake."""
        if not self.enabled or self.ca is None or self._mesh is None:
            return []
        now = self.clock()
        due = sorted(k for k, c in self.service_certs.items() if force or c.due(now))
        for kind in due:
            cert = self._issue_service(
                self.ca,
                self.service_certs[kind].spiffe_id,
                self._service_hosts[kind],
                self._mesh,
                now,
            )
            self.service_certs[kind] = cert
            self._service_tls[kind] = self._tls_for(kind, cert, self.roots)
        if due:
            self._keep()
        return due

    def service_tls(self, kind: str) -> ServerTls | None:
        """What service ``kind`` serves (its certificate, the mesh CA for its clients); the same
        object until the certificate changes. None when it has none. A lookup, safe to call
        from gRPC's handshake threads."""
        return self._service_tls.get(kind)

    def next_renewal(self) -> datetime | None:
        everything = (*self.certs.values(), *self.service_certs.values())
        return min((c.renew_at for c in everything), default=None)

    def secrets(self) -> dict[str, list[secret_pb2.Secret]] | None:
        """Node id -> its SDS secrets; None when the mesh does not use mTLS."""
        if not self.enabled or self.ca is None:
            return None
        bundle = self.bundle_pem
        return {node: proxy_secrets(c, bundle) for node, c in self.certs.items()}

    @property
    def bundle_pem(self) -> bytes:
        """The trust bundle: the root, or both roots while one is being rotated."""
        if self.roots is not None:
            return self.roots.bundle_pem
        return self.ca.root_pem if self.ca is not None else b""

    # -- root rotation (the phases: legation.certs.roots) ----------------------------------

    @property
    def root_phase(self) -> Phase | None:
        """The rotation phase being served; None when no rotation is under way."""
        return self.roots.state.phase if self.roots and self.roots.state else None

    def reload_roots(self) -> bool:
        """Read the generated CA's roots again (a rotation requested, advanced or finished by
        another process, or by :meth:`advance_root`). True if the roots served changed: a new
        signing root re-issues every certificate, a new bundle reaches the services at once;
        the caller republishes every proxy. Raises CertError (and changes nothing)."""
        where, mesh = self._ca_key, self._mesh
        if not self.enabled or where is None or mesh is None or not where.generate:
            return False
        if (
            self.roots is not None
            and self.roots.state is None
            and not rotation_requested(where.home)
        ):
            return False  # the usual case, every second: two stats, no key read
        roots = where.open_roots(mesh.mtls.trust_domain)
        if roots.same_as(self.roots):
            self.roots = roots  # the same roots; the record may say more (phase_since)
            return False
        signer_changed = self.ca is None or roots.signer.fingerprint != self.ca.fingerprint
        self.roots, self.ca = roots, roots.signer
        if signer_changed:
            self.rotate(force=True)
            self.rotate_services(force=True)
        else:
            self._service_tls = {
                k: self._tls_for(k, c, roots) for k, c in self.service_certs.items()
            }
        return True

    def advance_root(self, phase: Phase) -> None:
        """Record ``phase`` of the rotation under way (retiring the old root for
        :attr:`~legation.certs.roots.Phase.RETIRE`) and serve it (:meth:`reload_roots`)."""
        if self.roots is None or self.roots.state is None or self._ca_key is None:
            raise CertError("no root rotation is under way", code="rotation_invalid")
        advance(self._ca_key.home, self.roots.state, phase, now=self.clock())
        self.reload_roots()

    def status(self) -> dict[str, Any] | None:
        """The root's fingerprint and expiry, and each proxy's certificate (never keys)."""
        if not self.enabled or self.ca is None:
            return None
        return {
            "ca": {
                "fingerprint_sha256": self.ca.fingerprint,
                "not_after": self.ca.not_after.isoformat(),
                "source": self.ca.source,
                "trusted": [c.fingerprint for c in self.roots.trusted]
                if self.roots
                else [self.ca.fingerprint],
                "rotation": self.roots.state.to_json() if self.roots and self.roots.state else None,
            },
            "proxies": {node: c.summary() for node, c in sorted(self.certs.items())},
            "services": {kind: c.summary() for kind, c in sorted(self.service_certs.items())},
        }

    @staticmethod
    def _issue_service(
        ca: CertificateAuthority, sid: str, hosts: tuple[str, ...], mesh: Mesh, now: datetime
    ) -> WorkloadCert:
        return ca.issue_leaf(
            sid,
            ttl=mesh.mtls.cert_ttl,
            now=now,
            hosts=hosts,
            usages=_SERVICE_USAGES,
        )

    def _tls_for(self, kind: str, cert: WorkloadCert, roots: Roots | None) -> ServerTls:
        bundle = roots.bundle_pem if roots is not None else b""
        held = self._service_tls.get(kind)
        if (
            held is not None
            and held.cert_chain_pem == cert.cert_pem
            and held.client_ca_pem == bundle
        ):
            return held  # unchanged: the same object, so the running server keeps it
        return ServerTls(cert_chain_pem=cert.cert_pem, key_pem=cert.key_pem, client_ca_pem=bundle)

    def _open_ca(self, mesh: Mesh) -> Roots:
        where = locate_ca(mesh, mesh_dir=self.mesh_dir, default_ca_dir=self.default_ca_dir)
        if self.roots is not None and where == self._ca_key:
            return self.roots
        roots = where.open_roots(mesh.mtls.trust_domain)
        self._ca_key = where
        self._store = CertStore(where.home / "issued") if self.persist and where.generate else None
        return roots

    def _keep(self) -> None:
        """Persist the current certificates (with ``persist``)."""
        if self._store is not None:
            self._store.save(
                {
                    **{f"proxy-{n}": c for n, c in self.certs.items()},
                    **{f"service-{k}": c for k, c in self.service_certs.items()},
                }
            )
