"""The control plane as a running thing: a mesh file, watched, translated, served over ADS.

A change to the mesh file that validates is translated and handed to the snapshot cache (which
debounces it and pushes it to the proxies); one that does not is printed, counted, and changes
nothing: the running config stays. A small HTTP endpoint serves ``/status`` (JSON, what
``legation status`` prints), ``/metrics`` (Prometheus) and ``/healthz``.

The request-path services the mesh declares with ``embedded: true`` (the default) run on the same
event loop (:mod:`legation.services`): started before the xDS server (so before any Envoy can be
told to call them), updated on every valid reload before the new snapshots are published (the
ext_proc chains follow the routes), stopped last. Their files are validated with the mesh: a bad
``authz.yaml`` or ``ratelimit.yaml`` rejects the change like a bad mesh does.

When the mesh turns ``mtls`` on, a :class:`~legation.certs.MeshIssuer` opens (or creates) the CA
and gives every proxy a SPIFFE certificate, delivered in its snapshot as SDS secrets. Reloads keep
certificates whose identity is unchanged. The embedded request-path services get a server
certificate from the same CA (identity ``legation-<kind>``) and accept only clients with a
certificate from it, i.e. the proxies. A timer re-issues each certificate at 2/3 of its
lifetime: a service serves its new one from the next handshake on; the proxies' snapshots are
published again, only their SDS secrets change, so Envoy swaps certificates without restarting
or draining. ``/status`` shows the root's fingerprint and
each proxy's certificate (SPIFFE id, serial, expiry; never key material).

The xDS channel itself always needs the CA, whatever ``mtls.mode`` says: the server speaks TLS
with a certificate from it and serves only proxies enrolled with a credential from it
(:mod:`legation.xds.auth`). The CA is found as for mTLS (the mesh's ``mtls.ca_*`` settings, else
``.legation/ca``) when the control plane starts; :meth:`ControlPlane.enrol` issues a proxy's
credential files.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from legation.certs import CertificateAuthority, MeshIssuer
from legation.certs.enrol import BOOTSTRAP_TTL, Enrolments, NodeFiles, enrol, node_dir_name
from legation.certs.issuer import DEFAULT_CA_DIR, CaLocation, locate_ca
from legation.certs.workload import WorkloadCert
from legation.certs.xds_auth import XdsAuth, serving_hosts
from legation.config import Mesh, load_mesh
from legation.errors import LegationError
from legation.services import EmbeddedServices, Plan, ServiceStartError, plan
from legation.translate import translate
from legation.xds.cache import SnapshotCache
from legation.xds.metrics import XdsMetrics
from legation.xds.server import XdsServer
from legation.xds.snapshot import Snapshot
from legation.xds.types import ResourceType

log = logging.getLogger("legation.controlplane")

DEFAULT_STATUS_PORT = 18001
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found"}


class ControlPlane:
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
        ca_dir: Path | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        rotation_check: float = 60.0,
    ) -> None:
        """``embedded_services=False`` leaves the mesh's request-path services to others even
        when their blocks say ``embedded: true`` (only the Envoy side is configured).
        ``ca_dir``: where the generated CA lives when the mesh names none (default
        ``.legation/ca``). ``clock`` dates certificates; the rotation timer looks at it at least
        every ``rotation_check`` seconds (so a suspended machine catches up)."""
        self.mesh_path = Path(mesh_path)
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
        self.issuer = MeshIssuer(mesh_dir=self.mesh_path.parent,
                                 default_ca_dir=ca_dir or DEFAULT_CA_DIR, clock=clock)
        self.services = EmbeddedServices(on_event=self.on_event,
                                         tls_source=self.issuer.service_tls)
        self.clock = clock
        self.xds_ca: CertificateAuthority | None = None
        self.xds_ca_location: CaLocation | None = None
        self.rotation_check = rotation_check
        self._certs_changed = asyncio.Event()
        self._rotator: asyncio.Task[None] | None = None
        self.mesh: Mesh | None = None
        self.snapshots: dict[str, Snapshot] = {}
        self.generation = 0
        self.last_error: str | None = None
        self._digest = ""
        self._rejected = ""  # digest of the last rejected file, so it is reported once
        self._reloads = Counter(
            "legation_config_reloads", "Mesh reloads by result", ["result"], registry=self.registry
        )
        self._generation = Gauge(
            "legation_config_generation", "Mesh generation being served", registry=self.registry
        )
        self._rotations = Counter(
            "legation_certificate_rotations", "Workload certificates re-issued before expiry",
            registry=self.registry,
        )
        self.server: XdsServer | None = None
        self._status_server: asyncio.base_events.Server | None = None
        self._watcher: asyncio.Task[None] | None = None
        self.started_at = time.time()

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> ControlPlane:
        """Load and serve the mesh; raises ConfigError if the first load fails."""
        text = self.mesh_path.read_bytes()
        mesh = load_mesh(self.mesh_path)
        services = self._plan(mesh)
        snapshots, digest = self._translate(mesh, text, services)
        failures = await self.services.apply(services)
        if failures:
            await self.services.stop()
            raise ServiceStartError("\n".join(failures), code="service_start_failed")
        try:
            self._publish(mesh, snapshots, digest)
            where = locate_ca(mesh, mesh_dir=self.mesh_path.parent,
                              default_ca_dir=self.issuer.default_ca_dir)
            ca = where.open(mesh.mtls.trust_domain)
            self.xds_ca, self.xds_ca_location = ca, where
            host = self._xds_host or mesh.xds.host
            self.server = XdsServer(
                self.cache,
                host=host,
                port=self._xds_port if self._xds_port is not None else mesh.xds.port,
                auth=XdsAuth.for_ca(ca, where.home, hosts=serving_hosts(mesh.xds.host, host),
                                    clock=self.clock),
            )
            await self.server.start()
            self.cache.flush()
            self._status_server = await asyncio.start_server(
                self._serve_status, self.status_host, self.status_port
            )
        except BaseException:
            await self.stop()
            raise
        self.status_port = self._status_server.sockets[0].getsockname()[1]
        self._watcher = asyncio.create_task(self._watch())
        self._rotator = asyncio.create_task(self._rotate_when_due())
        return self

    async def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
        if self._rotator is not None:
            self._rotator.cancel()
        if self._status_server is not None:
            self._status_server.close()
        if self.server is not None:
            await self.server.stop(0.5)
        await self.services.stop()

    # -- reloads ---------------------------------------------------------------------------

    def _plan(self, mesh: Mesh) -> Plan:
        if not self.embedded_services:
            return Plan(embedded={}, remote={})
        reserved = {self.status_port: "the control plane's status endpoint (--status-port)"}
        if self.status_port == 0:
            reserved = {}
        return plan(mesh, mesh_path=self.mesh_path, reserved=reserved)

    def _translate(self, mesh: Mesh, text: bytes, services: Plan
                   ) -> tuple[dict[str, Snapshot], str]:
        """Snapshots for ``mesh``, with certificates for its proxies and for the embedded
        services that serve mTLS. A CA that cannot be opened raises (a LegationError) and leaves
        the certificates as they were."""
        digest = hashlib.sha256(text).hexdigest()[:8]
        self.issuer.update(mesh, services={k: s.host for k, s in services.embedded.items()
                                           if s.tls})
        self._certs_changed.set()
        version = f"g{self.generation + 1}-{digest}"
        return translate(mesh, version=version, secrets=self.issuer.secrets()), digest

    def _publish(self, mesh: Mesh, snapshots: dict[str, Snapshot], digest: str) -> None:
        for node, snap in snapshots.items():
            self.cache.set_snapshot(node, snap)
        for gone in set(self.snapshots) - set(snapshots):
            self.cache.clear_snapshot(gone)
        self.mesh, self.snapshots, self._digest = mesh, snapshots, digest
        self.generation += 1
        self._generation.set(self.generation)

    async def reload(self) -> bool:
        """Load the mesh file again; True if it changed and was applied. The embedded services
        follow first (new chains are served before routes name them), then the snapshots."""
        try:
            text = self.mesh_path.read_bytes()
        except OSError as err:
            return self._reject(f"{self.mesh_path}: cannot read: {err.strerror or err}")
        digest = hashlib.sha256(text).hexdigest()[:8]
        if digest in (self._digest, self._rejected):
            return False
        try:
            mesh = load_mesh(self.mesh_path)
            services = self._plan(mesh)
            snapshots, digest = self._translate(mesh, text, services)
        except LegationError as err:
            self._rejected = digest
            return self._reject(str(err))
        before = {p.node_id for p in self.mesh.proxies()} if self.mesh else set()
        failures = await self.services.apply(services)
        self._publish(mesh, snapshots, digest)
        self.last_error = "\n".join(failures) or None
        self._rejected = ""
        self._reloads.labels("applied").inc()
        self.on_event(f"mesh reloaded: generation {self.generation} ({self._digest})")
        added = {p.node_id for p in mesh.proxies()} - before
        if added:
            self.on_event(
                "new proxies in the mesh need an Envoy each (restart `legation up`): "
                + ", ".join(sorted(added))
            )
        return True

    def _reject(self, message: str) -> bool:
        self.last_error = message
        self._reloads.labels("rejected").inc()
        self.on_event(f"mesh change rejected, still serving generation {self.generation}:\n"
                      f"{message}")
        return False

    # -- enrolment ---------------------------------------------------------------------------

    def enrol(self, node_id: str, directory: Path | None = None, *,
              ttl: timedelta = BOOTSTRAP_TTL) -> tuple[WorkloadCert, NodeFiles]:
        """Issue ``node_id`` an xDS credential (revoking its previous one) and write its files
        into ``directory`` (default ``<CA dir>/../nodes/<node>``). Needs a started plane."""
        if self.xds_ca is None or self.xds_ca_location is None:
            raise RuntimeError("enrol() needs a started control plane")
        where = self.xds_ca_location
        directory = directory or where.nodes_dir / node_dir_name(node_id)
        return enrol(self.xds_ca, Enrolments.beside(where.home), node_id, directory, ttl=ttl,
                     clock=self.clock)

    # -- certificates ----------------------------------------------------------------------

    def rotate(self, *, force: bool = False) -> list[str]:
        """Re-issue the certificates due for renewal (all with ``force``) and publish the
        snapshots of those proxies again (only their SDS secrets change). Their node ids."""
        kinds = self.issuer.rotate_services(force=force)  # served from the next handshake on
        if kinds:
            self._rotations.inc(len(kinds))
            self._certs_changed.set()
            self.on_event(f"certificates renewed for services: {', '.join(kinds)}")
        nodes = self.issuer.rotate(force=force)
        if not nodes or self.mesh is None:
            return nodes
        version = f"g{self.generation}-{self._digest}"
        fresh = translate(self.mesh, version=version, secrets=self.issuer.secrets())
        for node in nodes:
            self.cache.set_snapshot(node, fresh[node])
            self.snapshots[node] = fresh[node]
        self._rotations.inc(len(nodes))
        self._certs_changed.set()
        self.on_event(f"certificates renewed for {len(nodes)} proxies")
        return nodes

    async def _rotate_when_due(self) -> None:
        while True:
            self._certs_changed.clear()
            due = self.issuer.next_renewal()
            wait = self.rotation_check
            if due is not None:
                wait = min(wait, max(0.0, (due - self.issuer.clock()).total_seconds()))
            try:
                await asyncio.wait_for(self._certs_changed.wait(), timeout=wait)
                continue  # new certificates, new schedule
            except TimeoutError:
                pass
            try:
                self.rotate()
            except Exception as err:  # keep the timer alive: expiring certificates are worse
                log.exception("certificate rotation failed")
                self.last_error = f"certificate rotation failed: {err}"
                await asyncio.sleep(self.rotation_check)

    async def _watch(self) -> None:
        last = b""
        while True:
            await asyncio.sleep(self.poll_interval)
            try:
                text = self.mesh_path.read_bytes()
            except OSError:
                text = b""
            if text != last:  # still being written: wait for it to hold still for one poll
                last = text
                continue
            await self.reload()

    # -- status ----------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        proxies = []
        for spec in self.mesh.proxies() if self.mesh else []:
            node = self.cache.status.get(spec.node_id)
            snap = self.snapshots.get(spec.node_id)
            entry: dict[str, Any] = {
                "node_id": spec.node_id,
                "kind": spec.kind,
                "service": spec.service,
                "admin": f"127.0.0.1:{spec.admin_port}",
                "listeners": {ls.name: f"{ls.host}:{ls.port}" for ls in spec.listeners},
                "expected": {t.short: snap.version(t) for t in ResourceType if snap
                             and snap.resources(t)},
            }
            entry.update(node.as_dict() if node else {"connected": False, "acked": {},
                                                       "last_nack": None, "nacks": 0})
            entry["in_sync"] = all(
                entry["acked"].get(t) == v for t, v in entry["expected"].items()
            )
            cert = self.issuer.certs.get(spec.node_id) if self.issuer.enabled else None
            if cert is not None:
                entry["certificate"] = cert.summary()
            proxies.append(entry)
        return {
            "mesh": str(self.mesh_path),
            "generation": self.generation,
            "xds": self.server.address if self.server else None,
            "last_error": self.last_error,
            "services": self.services.status(),
            "mtls": self._mtls_status(),
            "proxies": proxies,
        }

    def _mtls_status(self) -> dict[str, Any] | None:
        status = self.issuer.status()
        if status is None or self.mesh is None:
            return None
        return {"mode": self.mesh.mtls.mode, "trust_domain": self.mesh.mtls.trust_domain,
                "ca": status["ca"], "services": status["services"]}

    async def _serve_status(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            try:  # the request line: METHOD SP PATH SP VERSION, in ASCII
                _, path, _ = request.split(b"\r\n", 1)[0].decode("ascii").split(" ")
            except (ValueError, UnicodeDecodeError):
                path = ""
            if not path.startswith("/"):
                body, ctype, code = b"bad request\n", "text/plain", 400
            elif path.startswith("/status"):
                body, ctype, code = json.dumps(self.status()).encode(), "application/json", 200
            elif path.startswith("/metrics"):
                body = b"".join(
                    generate_latest(r) for r in (self.registry, *self.services.registries())
                )
                ctype, code = "text/plain; version=0.0.4", 200
            elif path.startswith("/healthz"):
                body, ctype, code = b"ok\n", "text/plain", 200
            else:
                body, ctype, code = b"not found\n", "text/plain", 404
            writer.write(
                f"HTTP/1.1 {code} {_REASONS[code]}\r\n"
                f"content-type: {ctype}\r\ncontent-length: {len(body)}\r\n"
                "connection: close\r\n\r\n".encode() + body
            )
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError,
                ConnectionError):
            pass
        finally:
            writer.close()
