"""The xDS channel of a control plane: its own root beside the mesh CA, the TLS server that
serves only enrolled proxies, and a proxy's enrolment.

The xDS channel itself always needs a CA, whatever ``mtls.mode`` says: its own root, kept beside
the mesh CA (``<CA dir>/xds/``, :func:`legation.certs.enrol.xds_root`), never the mesh root. The
server speaks TLS with a certificate from it and serves only proxies enrolled with a credential
from it (:mod:`legation.certs.xds_auth`). The CA directory is found as for mTLS (the mesh's
``mtls.ca_*`` settings, else ``.legation/ca``) when the control plane starts;
:meth:`ControlPlane.enrol` issues a proxy's credential files.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

from legation.certs import CertificateAuthority
from legation.certs.enrol import Enrolments, NodeFiles, enrol, node_dir_name, xds_root
from legation.certs.issuer import CaLocation, locate_ca
from legation.certs.workload import WorkloadCert
from legation.certs.xds_auth import XdsAuth, serving_hosts
from legation.config import Mesh
from legation.xds.cache import SnapshotCache
from legation.xds.server import XdsServer

__all__ = ["enrol_node", "xds_channel"]


async def xds_channel(
    mesh: Mesh,
    cache: SnapshotCache,
    *,
    mesh_dir: Path,
    default_ca_dir: Path,
    host: str | None,
    port: int | None,
    clock: Callable[[], datetime],
) -> tuple[XdsServer, CertificateAuthority, CaLocation]:
    """Start the xDS server for ``mesh`` (``host``/``port`` override the mesh's): TLS with a
    certificate from the xDS root (never the mesh root), serving only enrolled proxies."""
    where = locate_ca(mesh, mesh_dir=mesh_dir, default_ca_dir=default_ca_dir)
    ca = xds_root(where.home)
    bind = host or mesh.xds.host
    server = XdsServer(
        cache,
        host=bind,
        port=port if port is not None else mesh.xds.port,
        auth=XdsAuth.for_ca(ca, where.home, hosts=serving_hosts(mesh.xds.host, bind), clock=clock),
    )
    await server.start()
    return server, ca, where


def enrol_node(
    ca: CertificateAuthority,
    where: CaLocation,
    node_id: str,
    directory: Path | None,
    *,
    ttl: timedelta,
    clock: Callable[[], datetime],
) -> tuple[WorkloadCert, NodeFiles]:
    """Issue ``node_id`` an xDS credential (revoking its previous one) and write its files into
    ``directory`` (default ``<CA dir>/../nodes/<node>``)."""
    directory = directory or where.nodes_dir / node_dir_name(node_id)
    return enrol(ca, Enrolments.beside(where.home), node_id, directory, ttl=ttl, clock=clock)
