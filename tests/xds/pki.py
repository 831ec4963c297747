"""A throwaway CA directory for tests, laid out as the control plane's: the mesh root (workload
certificates) and, beside it, the xDS root (xDS servers that authenticate, nodes' credentials)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import grpc

from legation.certs.ca import CertificateAuthority
from legation.certs.enrol import Enrolments, NodeFiles, enrol, issue_node_credential, xds_root
from legation.certs.workload import WorkloadCert
from legation.certs.xds_auth import XdsAuth, serving_hosts
from legation.xds.auth import channel_credentials
from legation.xds.cache import SnapshotCache
from legation.xds.server import XdsServer


class TestPki:
    __test__ = False  # not a test class

    def __init__(self, directory: Path, *, trust_domain: str = "test.local") -> None:
        self.directory = directory
        self.ca_dir = directory / "ca"
        self.mesh_ca = CertificateAuthority.in_directory(self.ca_dir, trust_domain=trust_domain)
        self.ca = xds_root(self.ca_dir)  # what xDS credentials and the server's come from
        self.enrolments = Enrolments.beside(self.ca_dir)
        self._credentials: dict[str, grpc.ChannelCredentials] = {}

    def auth(self, host: str = "127.0.0.1") -> XdsAuth:
        return XdsAuth.for_ca(self.ca, self.ca_dir, hosts=serving_hosts(host))

    def server(self, cache: SnapshotCache, **kwargs: object) -> XdsServer:
        return XdsServer(cache, auth=self.auth(), **kwargs)  # type: ignore[arg-type]

    def issue(
        self,
        node: str,
        *,
        ttl: timedelta = timedelta(hours=1),
        record: bool = True,
        **kwargs: object,
    ) -> WorkloadCert:
        """A credential for ``node``; ``record=False`` leaves it unknown to the server."""
        cert = issue_node_credential(self.ca, node, ttl=ttl, **kwargs)  # type: ignore[arg-type]
        if record:
            self.enrolments.record(node, cert)
        return cert

    def channel_credentials(self, cert: WorkloadCert) -> grpc.ChannelCredentials:
        return channel_credentials(cert.cert_pem, cert.key_pem, self.ca.root_pem)

    def credentials(self, node: str) -> grpc.ChannelCredentials:
        """The node's current credential (issued once per node)."""
        if node not in self._credentials:
            self._credentials[node] = self.channel_credentials(self.issue(node))
        return self._credentials[node]

    def enrol_files(self, node: str) -> NodeFiles:
        """Enrol ``node`` with credential files, as `legation bootstrap` does."""
        return enrol(self.ca, self.enrolments, node, self.directory / "nodes" / node)[1]
