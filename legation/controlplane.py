"""The control plane as a running thing: a mesh file, watched, validated, served over ADS.

The reload loop lives here; the rest is delegated: the request-path services to
:mod:`legation.services` (planned, started, swapped), certificates to
:class:`~legation.certs.MeshIssuer` and their renewal to :mod:`legation.certs.rotation`, the
``/status``, ``/metrics`` and ``/healthz`` endpoint to :mod:`legation.status_http`.

Inputs are the mesh file and the files its embedded services read (``authz.yaml``, the
rate-limit YAML, the Rego policy directories). A change to any of them that validates is applied:
one validation phase first (the mesh, every service file and reference, the translation), and
nothing is created before it passes; then certificates are issued, the services follow (new
chains and configs are served before routes name them) and the snapshots are published. A change
that does not validate is printed, counted (``legation_config_reloads{result="rejected"}``), shown
in ``/status`` and changes nothing: the running config stays. An edit to a service's file alone
swaps that service's config live and publishes nothing new to the proxies.

When the mesh turns ``mtls`` on, a :class:`~legation.certs.MeshIssuer` opens (or creates) the CA
and gives every proxy a SPIFFE certificate, delivered in its snapshot as SDS secrets. Reloads keep
certificates whose identity is unchanged. The embedded request-path services get a server
certificate from the same CA (identity ``legation-<kind>``) and accept only clients with a
certificate from it, i.e. the proxies; so does the embedded trace receiver (``legation-tracing``,
:mod:`legation.tracing.receiver`). ``/status`` shows the root's fingerprint and each proxy's
certificate (SPIFFE id, serial, expiry; never key material).

The xDS channel (its own root, TLS, enrolment) is :mod:`legation._xds_channel`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

from legation._publishing import Publishing
from legation._reloading import Reloading, trace_peers
from legation._xds_channel import enrol_node, xds_channel
from legation.certs import CertificateAuthority, MeshIssuer
from legation.certs.enrol import (
    BOOTSTRAP_TTL,
    NodeFiles,
)
from legation.certs.issuer import DEFAULT_CA_DIR, CaLocation
from legation.certs.rotation import Rotation
from legation.certs.workload import WorkloadCert
from legation.config import Mesh
from legation.services import EmbeddedServices, ServiceStartError
from legation.services.published import PublishedServices
from legation.status_http import StatusEndpoint, status_document
from legation.tracing.query import traces_document
from legation.tracing.receiver import EmbeddedCollector
from legation.xds.cache import SnapshotCache
from legation.xds.metrics import XdsMetrics
from legation.xds.server import XdsServer
from legation.xds.snapshot import Snapshot

log = logging.getLogger("legation.controlplane")

DEFAULT_STATUS_PORT = 18001


class ControlPlane(Reloading, Publishing):
    def __init__(
        self,
        mesh_path: str | Path,
        *,
        xds_host: str | None = None,
        xds_port: int | None = None,
        status_host: str = "127.0.0.1",
        status_port: int = DEFAULT_STATUS_PORT,
        debounce: float = 0.1,
        max_delay: float = 10.0,
        poll_interval: float = 0.5,
        on_event: Callable[[str], None] | None = None,
        embedded_services: bool = True,
        services_dir: Path | None = None,
        processes_file: Path | None = None,
        ca_dir: Path | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        rotation_check: float = 60.0,
        capture: bool = False,
    ) -> None:
        """``embedded_services=False`` leaves the mesh's request-path services to others even
        when their blocks say ``embedded: true`` (only the Envoy side is configured).
        ``services_dir``: the embedded services run as processes of their own
        (``legation serve <kind> --plan``): each accepted generation is published there for them
        (:mod:`legation.services.published`) instead of being run on this loop.
        ``processes_file``: the JSON list of supervised processes ``legation up`` keeps, shown
        in ``/status`` as ``processes``.
        ``ca_dir``: where the generated CA lives when the mesh names none (default
        ``.legation/ca``). ``clock`` dates certificates; the rotation timer looks at it at least
        every ``rotation_check`` seconds (so a suspended machine catches up).
        ``capture``: translate as if the mesh had a ``capture`` block (`legation up --capture`)."""
        self.mesh_path = Path(mesh_path)
        self.capture = capture
        self.registry = CollectorRegistry()
        self.cache = SnapshotCache(
            debounce=debounce, max_delay=max_delay, metrics=XdsMetrics(self.registry)
        )
        self._xds_host = xds_host
        self._xds_port = xds_port
        self.status_host = status_host
        self.status_port = status_port
        self.poll_interval = poll_interval
        self.on_event = on_event or (lambda line: log.info("%s", line))
        self.embedded_services = embedded_services
        self.issuer = MeshIssuer(
            mesh_dir=self.mesh_path.parent,
            default_ca_dir=ca_dir or DEFAULT_CA_DIR,
            clock=clock,
            persist=True,
        )  # a restart re-uses the valid certificates
        self.services: EmbeddedServices | PublishedServices
        if services_dir is not None:
            self.services = PublishedServices(
                services_dir,
                source=lambda: (str(self.mesh_path.resolve()), self._text, self._inputs),
                tls_source=self.issuer.service_tls,
                on_event=self.on_event,
            )
        else:
            self.services = EmbeddedServices(
                on_event=self.on_event, tls_source=self.issuer.service_tls
            )
        self.processes_file = processes_file
        self.rotation = Rotation(
            self.issuer,
            republish=self._republish,
            registry=self.registry,
            on_event=self.on_event,
            on_error=self._set_error,
            check_every=rotation_check,
            root_check=min(1.0, rotation_check),
            in_sync=lambda: all(self._in_sync(n) for n in self.snapshots),
        )
        self.clock = clock
        self.xds_ca: CertificateAuthority | None = None
        self.xds_ca_location: CaLocation | None = None
        self.mesh: Mesh | None = None
        self.snapshots: dict[str, Snapshot] = {}
        self.generation = 0
        self.last_error: str | None = None
        self._digest = ""  # of the mesh file being served
        self._inputs = ""  # of the mesh file and the services' files being served
        self._text = ""  # the mesh file being served (what service processes are handed)
        self._rejected = ""  # of the inputs last rejected, so a rejection is reported once
        self._watched: tuple[Path, ...] = ()
        self._reloads = Counter(
            "legation_config_reloads", "Mesh reloads by result", ["result"], registry=self.registry
        )
        self._generation = Gauge(
            "legation_config_generation", "Mesh generation being served", registry=self.registry
        )
        self.server: XdsServer | None = None
        # tracing: {collector: embedded}; with mTLS it serves the issuer's "tracing" certificate
        self.collector = EmbeddedCollector(tls_source=self.issuer.service_tls)
        self._status = StatusEndpoint(
            status=self.status,
            registries=lambda: (self.registry, *self.services.registries()),
            more_metrics=getattr(self.services, "metrics_text", None),
            golden=self.services.golden,
            traces=lambda query: traces_document(self.collector.store, query),
        )
        self._watcher: asyncio.Task[None] | None = None
        self._hold: asyncio.Task[None] | None = None
        self.started_at = time.time()

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> ControlPlane:
        """Load and serve the mesh; raises ConfigError if the first load fails (nothing is
        created then: no CA, no server), ServiceStartError if an embedded service cannot start."""
        text = self.mesh_path.read_bytes()
        mesh, services = self._validate(text)
        self._issue(mesh, services)
        failures = await self.services.apply(services)
        if failures:
            await self.services.stop()
            raise ServiceStartError("\n".join(failures), code="service_start_failed")
        try:
            await self.collector.follow(mesh.tracing, peers=trace_peers(mesh))
            self._publish(mesh, text)
            self.server, self.xds_ca, self.xds_ca_location = await xds_channel(
                mesh,
                self.cache,
                mesh_dir=self.mesh_path.parent,
                default_ca_dir=self.issuer.default_ca_dir,
                host=self._xds_host,
                port=self._xds_port,
                clock=self.clock,
            )
            self.cache.flush()
            self.status_port = await self._status.start(self.status_host, self.status_port)
        except BaseException:
            await self.stop()
            raise
        self._watcher = asyncio.create_task(self._watch())
        self.rotation.start()
        return self

    async def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
        self._cancel_hold()
        self.rotation.stop()
        await self._status.stop()
        if self.server is not None:
            await self.server.stop(0.5)
        await self.services.stop()
        await self.collector.stop()

    # -- enrolment ---------------------------------------------------------------------------

    def enrol(
        self, node_id: str, directory: Path | None = None, *, ttl: timedelta = BOOTSTRAP_TTL
    ) -> tuple[WorkloadCert, NodeFiles]:
        """Issue ``node_id`` an xDS credential (revoking its previous one) and write its files
        into ``directory`` (default ``<CA dir>/../nodes/<node>``). Needs a started plane."""
        if self.xds_ca is None or self.xds_ca_location is None:
            raise RuntimeError("enrol() needs a started control plane")
        return enrol_node(
            self.xds_ca, self.xds_ca_location, node_id, directory, ttl=ttl, clock=self.clock
        )

    # -- certificates ----------------------------------------------------------------------

    def rotate(self, *, force: bool = False) -> list[str]:
        """Re-issue the certificates due for renewal (all with ``force``) and publish the
        snapshots of those proxies again (only their SDS secrets change). Their node ids."""
        return self.rotation.rotate(force=force)

    # -- status ----------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """What ``/status`` serves (see :func:`legation.status_http.status_document`)."""
        return status_document(self)
