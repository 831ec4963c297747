"""Where a mesh's CA lives (its directory, or the operator's own root files) and the SPIFFE
identities the mesh's proxies and request-path services get."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from legation.certs.ca import CERT_FILE, KEY_FILE, CertificateAuthority
from legation.certs.roots import Roots, open_roots
from legation.certs.spiffe import service_name, spiffe_id
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

    def open_roots(self, trust_domain: str) -> Roots:
        """The signing root and the trust bundle; a generated CA's as its root rotation
        (:mod:`legation.certs.roots`) says, configured files' always the one root."""
        if self.generate:
            return open_roots(self.home, trust_domain=trust_domain)
        ca = self.open(trust_domain)
        return Roots(ca, (ca,), None)


def locate_ca(mesh: Mesh, *, mesh_dir: Path, default_ca_dir: Path = DEFAULT_CA_DIR) -> CaLocation:
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


def service_identity(mesh: Mesh, kind: str) -> str:
    """The SPIFFE id of request-path service ``kind`` (``.../sa/legation-<kind>``)."""
    return spiffe_id(mesh.mtls.trust_domain, mesh.mtls.namespace, service_name(kind))


_WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", "[::]", ""})


def _service_hosts(kind: str, host: str) -> tuple[str, ...]:
    return (service_name(kind), *(() if host in _WILDCARD_HOSTS else (host.strip("[]"),)))
