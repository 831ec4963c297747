"""xDS enrolment: the credential a proxy presents to the control plane, and which one is current.

A proxy proves who it is to the xDS server with a client certificate signed by the xDS root
(:func:`xds_root`: a CA of its own kept in ``<mesh CA dir>/xds/``, never the mesh root) whose only
URI SAN is ``spiffe://xds.legation.internal/node/<node id, percent-encoded>`` (the trust
domain is reserved: :func:`~legation.certs.spiffe.spiffe_id` refuses it, so no workload
certificate can pass for an enrolment credential, nor one for the other). The node id is UTF-8,
percent-encoded with everything but ``A-Z a-z 0-9 - . _ ~`` escaped; only that canonical
encoding is accepted back. The xDS server's own certificate, from the same xDS root, carries
:data:`XDS_SERVER_ID`, which proxies check. Two roots, so that neither side accepts the other's
certificates: the mesh trust bundle (the mesh root) never accepts an xDS credential as a mesh
peer, and the xDS server (the xDS root) never accepts a workload certificate.

Revocation: every credential issued is recorded in ``xds-nodes.json`` next to the CA (node id ->
serial); the server accepts only the newest serial of each node, so re-enrolling a node (``legation
bootstrap --rotate``) revokes its previous credential, and a new xDS root revokes them all (the
chain no longer verifies). A read of the registry that fails (say, out of descriptors) keeps the
last good view and is retried on the next check. Expiry: :data:`BOOTSTRAP_TTL` for credentials
handed out by ``legation bootstrap``; ``legation up`` issues shorter ones and re-issues them
before they expire.

Files of one node (in a directory of its own, 0700): ``ca.crt`` (the xDS root, to verify the
server with) and ``xds-client.yaml``, 0600: a file-based SDS response holding the certificate and
key inline, so one atomic rename replaces both and Envoy (watching the directory) picks the new pair
up without a restart.
"""

from __future__ import annotations

import json
import os
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import yaml
from cryptography.x509.oid import ExtendedKeyUsageOID

from legation.certs._files import exclusive_lock, private_dir, write_private
from legation.certs.ca import CertificateAuthority
from legation.certs.errors import CertError
from legation.certs.spiffe import XDS_TRUST_DOMAIN
from legation.certs.workload import WorkloadCert

XDS_NODE_PREFIX = f"spiffe://{XDS_TRUST_DOMAIN}/node/"
XDS_SERVER_ID = f"spiffe://{XDS_TRUST_DOMAIN}/control-plane"
REGISTRY_FILE = "xds-nodes.json"
CLIENT_SECRET = "legation-xds-client"
CLIENT_SDS_FILE = "xds-client.yaml"
ROOT_FILE = "ca.crt"
#: The xDS root's directory, inside the mesh CA's.
XDS_ROOT_DIR = "xds"
MAX_NODE_ID_BYTES = 1024

#: ``legation bootstrap``: the operator re-runs it (``--rotate``) within a month.
BOOTSTRAP_TTL = timedelta(days=30)
#: ``legation up`` re-issues at 2/3 of this and rewrites the files its Envoys watch.
UP_TTL = timedelta(hours=12)
#: The xDS server's own certificate (re-issued at 2/3 of it by the running server).
SERVER_TTL = timedelta(days=30)

_SAFE = "-._~"


def node_uri(node_id: str) -> str:
    """The URI SAN naming ``node_id``; raises ``bad_identity`` for an empty or huge id."""
    raw = node_id.encode("utf-8", "surrogatepass")
    if not node_id or len(raw) > MAX_NODE_ID_BYTES:
        raise CertError(
            f"node id {node_id[:80]!r}: must be 1 to {MAX_NODE_ID_BYTES} bytes", code="bad_identity"
        )
    return XDS_NODE_PREFIX + urllib.parse.quote_from_bytes(raw, safe=_SAFE)


def node_of_uri(uri: str) -> str | None:
    """The node id a URI SAN names, or None if it names none (or is not canonically encoded)."""
    if not uri.startswith(XDS_NODE_PREFIX):
        return None
    encoded = uri[len(XDS_NODE_PREFIX) :]
    try:
        node = urllib.parse.unquote_to_bytes(encoded).decode("utf-8")
    except UnicodeDecodeError:
        return None
    try:
        canonical = node_uri(node)
    except CertError:
        return None
    return node if canonical == uri else None


def node_dir_name(node_id: str) -> str:
    """A file name for ``node_id``'s directory: percent-encoded, never ``.`` or ``..``."""
    name = urllib.parse.quote(node_id, safe="-_~.")
    return name.replace(".", "%2E") if set(name) == {"."} else name


def xds_root(ca_home: Path) -> CertificateAuthority:
    """The root that signs enrolment credentials and the xDS server's certificate, kept in
    ``ca_home/xds/`` beside the mesh CA (``ca_home``: its directory) and generated there on
    first use, with the same file safety as the mesh CA. It is never the mesh root."""
    try:
        private_dir(ca_home)  # 0700 even when the xDS root is made before the mesh CA
    except OSError as err:
        raise CertError(
            f"{ca_home}: cannot create: {err.strerror or err}", code="ca_write_failed"
        ) from None
    return CertificateAuthority.in_directory(ca_home / XDS_ROOT_DIR, trust_domain=XDS_TRUST_DOMAIN)


def issue_node_credential(
    ca: CertificateAuthority, node_id: str, *, ttl: timedelta, now: datetime | None = None
) -> WorkloadCert:
    return ca.issue_leaf(
        node_uri(node_id),
        ttl=ttl,
        now=now,
        usages=(ExtendedKeyUsageOID.CLIENT_AUTH,),
        common_name=f"xds node {node_id}"[:64],
    )


def issue_server_credential(
    ca: CertificateAuthority, hosts: list[str], *, ttl: timedelta, now: datetime | None = None
) -> WorkloadCert:
    """The xDS server's certificate: :data:`XDS_SERVER_ID` and a SAN per host it is reached at."""
    return ca.issue_leaf(
        XDS_SERVER_ID,
        ttl=ttl,
        now=now,
        hosts=hosts,
        usages=(ExtendedKeyUsageOID.SERVER_AUTH,),
        common_name="legation xds",
    )


class Enrolments:
    """Node id -> serial of its current credential, persisted in ``xds-nodes.json``.

    Writers (the control plane, ``legation bootstrap``) take an exclusive lock around a
    read-modify-write and replace the file atomically; the xDS server re-reads it whenever its
    size or modification time changes, so a credential re-issued by another process revokes the
    old one without a restart."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._seen: tuple[int, int, int] | None = None
        self._serials: dict[str, int] = {}

    @classmethod
    def beside(cls, ca_home: Path) -> Enrolments:
        return cls(ca_home / REGISTRY_FILE)

    def current(self, node_id: str) -> int | None:
        """The serial the server accepts for ``node_id`` now (None: none enrolled)."""
        self._refresh()
        return self._serials.get(node_id)

    def record(
        self, node_id: str, cert: WorkloadCert, *, write_files: Callable[[], object] | None = None
    ) -> None:
        """Make ``cert`` the node's only accepted credential. ``write_files`` (the node's
        credential files) runs first under the same lock, so two enrolments of one node at once
        leave its files and the registry naming the same credential."""
        try:
            private_dir(self.path.parent)
            with exclusive_lock(self.path.with_name(f".{self.path.name}.lock")):
                if write_files is not None:
                    write_files()
                nodes = self._read()
                nodes[node_id] = {
                    "serial": cert.serial_hex,
                    "not_after": cert.not_after.isoformat(),
                }
                now = datetime.now(UTC).isoformat()
                nodes = {n: e for n, e in nodes.items() if e.get("not_after", "") > now}
                body = json.dumps({"nodes": nodes}, indent=1, sort_keys=True).encode()
                write_private(self.path, body + b"\n", 0o600)
        except OSError as err:
            raise CertError(
                f"{self.path}: cannot record the credential of node "
                f"{node_id[:80]!r}: {err.strerror or err}",
                code="enrolment_failed",
            ) from None
        self._seen = None

    def _read(self) -> dict[str, dict[str, Any]]:
        try:
            doc = json.loads(self.path.read_bytes())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):
            raise CertError(
                f"{self.path}: unreadable; remove it and enrol the proxies again",
                code="enrolment_failed",
            ) from None
        nodes = doc.get("nodes") if isinstance(doc, dict) else None
        if not isinstance(nodes, dict):
            raise CertError(f"{self.path}: nodes: expected a mapping", code="enrolment_failed")
        return nodes

    def _refresh(self) -> None:
        """Re-read the registry if it changed. A read that fails keeps the last good view (a
        failure is no news about who is enrolled, and caching it as "nobody" would refuse every
        proxy until the file changes again) and is retried on the next check."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._seen, self._serials = None, {}
            return
        except OSError:
            return
        seen = (st.st_ino, st.st_size, st.st_mtime_ns)
        if seen == self._seen:
            return
        try:
            nodes = self._read()
            serials = {n: int(e["serial"], 16) for n, e in nodes.items()}
        except (CertError, KeyError, TypeError, ValueError, AttributeError):
            return  # the last good view stands; nothing before one refuses everyone
        self._serials, self._seen = serials, seen


@dataclass(frozen=True, slots=True)
class NodeFiles:
    """Where one node's credential files are."""

    directory: Path

    @property
    def sds(self) -> Path:
        return self.directory / CLIENT_SDS_FILE

    @property
    def root(self) -> Path:
        return self.directory / ROOT_FILE

    def read(self) -> tuple[bytes, bytes, bytes]:
        """(certificate PEM, key PEM, root PEM): what a non-Envoy client presents."""
        doc = yaml.safe_load(self.sds.read_text())
        tls = doc["resources"][0]["tls_certificate"]
        return (
            tls["certificate_chain"]["inline_string"].encode(),
            tls["private_key"]["inline_string"].encode(),
            self.root.read_bytes(),
        )


def write_node_files(directory: Path, cert: WorkloadCert, root_pem: bytes) -> NodeFiles:
    """Write ``cert`` as the node's credential files (0600, in a 0700 directory)."""
    files = NodeFiles(directory)
    secret = {
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret",
        "name": CLIENT_SECRET,
        "tls_certificate": {
            "certificate_chain": {"inline_string": cert.cert_pem.decode()},
            "private_key": {"inline_string": cert.key_pem.decode()},
        },
    }
    try:
        private_dir(directory)
        write_private(files.root, root_pem, 0o644)
        write_private(files.sds, yaml.safe_dump({"resources": [secret]}).encode(), 0o600)
    except OSError as err:
        raise CertError(
            f"{directory}: cannot write the xDS credential: {err.strerror or err}",
            code="enrolment_failed",
        ) from None
    return files


def enrol(
    ca: CertificateAuthority,
    enrolments: Enrolments,
    node_id: str,
    directory: Path,
    *,
    ttl: timedelta = BOOTSTRAP_TTL,
    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> tuple[WorkloadCert, NodeFiles]:
    """Issue ``node_id`` a credential from ``ca`` (the xDS root, :func:`xds_root`), write its
    files into ``directory``, then make it the node's only accepted one (the previous credential
    is revoked once the new files exist; both under the registry's lock)."""
    cert = issue_node_credential(ca, node_id, ttl=ttl, now=clock())
    enrolments.record(
        node_id, cert, write_files=lambda: write_node_files(directory, cert, ca.root_pem)
    )
    return cert, NodeFiles(directory)
