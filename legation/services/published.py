"""The request-path services as processes of their own: what the control plane hands them.

With ``legation up`` (and ``legation serve xds --services-dir DIR``) the control plane does not run
the services: it plans them as usual (one validation phase) and, for every accepted generation,
publishes each service's part into ``DIR/<kind>/``, a 0700 directory of 0600 files:

* ``plan.json``: the accepted mesh (its text and path, so relative paths resolve against its
  folder), the digest of every input that was validated with it, and whether to serve mTLS;
* ``cert.pem``, ``key.pem``, ``ca.pem``: with mTLS on, the service's server certificate
  (``spiffe://.../sa/legation-<kind>``), its key, and the mesh root its clients must chain to.

A ``legation serve <kind> --plan DIR/<kind>/plan.json`` process (:mod:`legation.services.follower`)
follows the plan file (a changed one is swapped in live, or the server restarted when its address
or TLS changed) and reads the certificate files before each handshake, so a renewal needs no
restart. The files stay when the control plane stops: a service process started again, or one that
outlives the control plane, serves the last good config. Files are replaced by rename, never
rewritten in place, so a reader sees the old file or the new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from legation.certs._files import private_dir, write_private
from legation.errors import LegationError
from legation.grpc_server import ServerTls
from legation.services._file_tls import CA_FILE, CERT_FILE, KEY_FILE, FileTls
from legation.services.kinds import KINDS
from legation.services.planning import Plan

log = logging.getLogger("legation.services.published")

__all__ = [
    "FileTls",
    "PublishedServices",
    "ServicePlan",
    "metrics_port_file",
    "plan_path",
    "read_plan",
]

PLAN_FILE = "plan.json"
METRICS_PORT_FILE = "metrics-{worker}.port"  # written by each worker: where its /metrics is


def metrics_port_file(worker: int) -> str:
    """The file (beside the plan) where ``worker`` writes the port of its ``/metrics``."""
    return METRICS_PORT_FILE.format(worker=worker)


def plan_path(directory: Path, kind: str) -> Path:
    """Where service ``kind``'s plan is published below ``directory``."""
    return directory / kind / PLAN_FILE


@dataclass(frozen=True, kw_only=True)
class ServicePlan:
    """One service's part of an accepted generation, as ``plan.json`` holds it."""

    kind: str
    mesh_path: str
    mesh_text: str
    inputs: str
    """Digest of the mesh and the services' files as validated (a new one is a new plan)."""
    address: str
    tls: bool

    def to_json(self) -> bytes:
        return json.dumps(self.__dict__, indent=1, sort_keys=True).encode()


def read_plan(path: Path) -> ServicePlan:
    """Parse a published ``plan.json``; raises OSError or ValueError."""
    raw = json.loads(path.read_bytes())
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: not a plan")
    return ServicePlan(**{k: raw[k] for k in ServicePlan.__dataclass_fields__})


class PublishedServices:
    """The control plane's side: the same ``apply``/``stop``/``status`` as
    :class:`~legation.services.embedded.EmbeddedServices`, but each service is published to
    files for the process that runs it. ``source()`` is the accepted mesh (path, text, inputs
    digest) that ``apply`` is called for; ``tls_source(kind)`` the service's certificate."""

    def __init__(
        self,
        directory: Path,
        *,
        source: Callable[[], tuple[str, str, str]],
        tls_source: Callable[[str], ServerTls | None] | None = None,
        on_event: Callable[[str], None] | None = None,
        tls_check: float = 1.0,
    ) -> None:
        self.directory = directory
        self.source = source
        self.tls_source = tls_source
        self.on_event = on_event or (lambda line: log.info("%s", line))
        self.tls_check = tls_check
        self.published: dict[str, ServicePlan] = {}
        self.workers: dict[str, int] = {}
        self.remote: dict[str, str] = {}
        self._tls_written: dict[str, ServerTls] = {}
        self._task: asyncio.Task[None] | None = None

    async def apply(self, target: Plan) -> list[str]:
        """Publish ``target``: a plan file per service (rewritten only when it changed), their
        certificates, and no directory for a kind that is gone. Returns the failures."""
        failures: list[str] = []
        mesh_path, text, inputs = self.source()
        self.remote = dict(target.remote)
        private_dir(self.directory)
        for kind in KINDS:
            spec = target.embedded.get(kind.name)
            folder = self.directory / kind.name
            if spec is None:
                self.published.pop(kind.name, None)
                self._tls_written.pop(kind.name, None)
                if folder.exists():
                    shutil.rmtree(folder, ignore_errors=True)
                continue
            plan = ServicePlan(
                kind=kind.name,
                mesh_path=mesh_path,
                mesh_text=text if kind.name == "ratelimit" else _redacted(text),
                inputs=inputs,
                address=f"{spec.host}:{spec.port}",
                tls=spec.tls,
            )
            try:
                private_dir(folder)
                if spec.tls:
                    self._write_tls(kind.name, force=kind.name not in self.published)
                if self.published.get(kind.name) != plan:
                    write_private(folder / PLAN_FILE, plan.to_json())
            except (OSError, ValueError, LegationError) as err:
                failures.append(f"cannot publish the {kind.name} service's plan in {folder}: {err}")
                self.on_event(failures[-1])
                continue
            self.published[kind.name] = plan
            self.workers[kind.name] = spec.workers
        if self._task is None and any(p.tls for p in self.published.values()):
            self._task = asyncio.get_running_loop().create_task(self._follow_tls())
        return failures

    async def stop(self) -> None:
        """Stop following certificate renewals; the files stay (the processes keep serving)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def registries(self) -> list[Any]:
        return []  # each process serves its own metrics: see metrics_text

    def metrics_text(self) -> bytes:
        """The service processes' Prometheus text (each worker serves it, its samples labelled
        ``worker``, on the loopback port it wrote beside its plan), merged for the control
        plane's ``/metrics`` (:func:`legation._worker_metrics.merge`); a worker that does not
        answer within a second is left out. Blocking: call it on a thread."""
        from prometheus_client import CollectorRegistry, generate_latest

        from legation._worker_metrics import merge

        texts = []
        for kind in list(self.published):
            for worker in range(self.workers.get(kind, 1)):
                try:
                    texts.append((worker, self._metrics_of(kind, worker).decode()))
                except (OSError, ValueError):
                    continue
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Families(merge(texts)))  # type: ignore[arg-type]
        return bytes(generate_latest(registry))

    def golden(self) -> dict[str, Any] | None:
        """The access-log service process's golden metrics, read back from its ``/metrics``
        (:func:`legation.observe.prometheus.snapshot_from_text`); None without that service or
        when it does not answer within a second. Blocking: call it on a thread."""
        if "accesslog" not in self.published:
            return None
        from legation.observe.prometheus import snapshot_from_text

        try:
            text = self._metrics_of("accesslog")
        except (OSError, ValueError):
            return None
        return snapshot_from_text(text.decode())

    def _metrics_of(self, kind: str, worker: int = 0) -> bytes:
        port = int((self.directory / kind / metrics_port_file(worker)).read_text())
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1) as resp:
            body: bytes = resp.read()
        return body

    def status(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for name, plan in self.published.items():
            out[name] = {
                "embedded": True,
                "address": plan.address,
                "tls": "mesh" if plan.tls else "none",
                "process": "own",
                "workers": self.workers.get(name, 1),
                "plan": str(plan_path(self.directory, name)),
            }
        for name, address in self.remote.items():
            out[name] = {"embedded": False, "address": address}
        return out

    def _write_tls(self, kind: str, *, force: bool = False) -> None:
        tls = self.tls_source(kind) if self.tls_source else None
        if tls is None or (not force and self._tls_written.get(kind) is tls):
            return
        folder = self.directory / kind
        # key first, certificate last: a reader checks that the pair matches (FileTls)
        write_private(folder / CA_FILE, tls.client_ca_pem)
        write_private(folder / KEY_FILE, tls.key_pem)
        write_private(folder / CERT_FILE, tls.cert_chain_pem)
        self._tls_written[kind] = tls

    async def _follow_tls(self) -> None:
        """Renewed service certificates (the rotation timer) reach the files within a check."""
        while True:
            await asyncio.sleep(self.tls_check)
            for kind, plan in list(self.published.items()):
                if plan.tls:
                    try:
                        self._write_tls(kind)
                    except OSError as err:
                        self.on_event(f"cannot write the {kind} service's certificate: {err}")


class _Families:
    def __init__(self, families: list[Any]) -> None:
        self.families = families

    def collect(self) -> Any:
        return iter(self.families)


def _redacted(text: str) -> str:
    """The mesh for a service other than the rate limiter: the Redis password in
    ``ratelimit.redis_url`` (only the rate limiter needs it) replaced, the rest as it was."""
    import yaml

    try:
        doc = yaml.safe_load(text)
        url = doc["ratelimit"]["redis_url"]
    except (yaml.YAMLError, KeyError, TypeError):
        return text
    parts = urllib.parse.urlsplit(str(url))
    if not parts.password:
        return text
    netloc = parts.netloc.replace(f":{parts.password}@", ":redacted@", 1)
    doc["ratelimit"]["redis_url"] = urllib.parse.urlunsplit(parts._replace(netloc=netloc))
    return str(yaml.safe_dump(doc, sort_keys=False))
