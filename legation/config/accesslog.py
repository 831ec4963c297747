"""The ``accesslog`` block: Legation's access-log service (golden metrics) and the JSON access
log every proxy writes.

::

    accesslog: {port: 18013}                                  # golden metrics only
    accesslog:
      port: 18013
      log: {to: file, path: .legation/logs/access-{node}.jsonl}   # JSON lines, every proxy
      proxies: {gateway-ingress: {to: stdout}}                # a proxy's own destination

With the block, every HTTP connection manager the control plane configures (the gateway, the
sidecars' inbound and outbound listeners) streams each finished request to the service over
Envoy's gRPC access-log protocol, batched per Envoy worker (``flush_interval``); the service
aggregates them into golden metrics (``legation status``, ``legation top``, ``/metrics``). A
request never waits for the service: Envoy drops entries it cannot send. ``failure_mode`` and
``timeout`` do not apply.

``log`` (default for every proxy) and ``proxies`` (by node id) choose where the JSON access-log
lines go: ``none`` (the default), ``file`` (``path``, ``{node}`` replaced by the proxy's node
id; relative to the Envoys' working directory, where ``legation up`` runs; its folder must exist
there, which ``legation up`` sees to, else the proxy refuses the listener: a NACK in ``legation
status``), ``stdout``
(Envoy's own output, which ``legation up`` writes to the proxy's log file) or ``service`` (the
access-log service writes them to ``path``, relative to its own working directory, from the
entries it receives anyway: one place collects the lines of proxies on other machines; see
:mod:`legation.observe.jsonlines`). The fields are
:data:`legation.observe.envoy_config.JSON_FIELDS`; credentials never are.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Literal

from pydantic import BaseModel, Field, field_validator

from legation.config._types import STRICT, Duration
from legation.config.extensions import GrpcService


class JsonLog(BaseModel):
    """Where one proxy's JSON access-log lines go."""

    model_config = STRICT
    to: Literal["none", "file", "stdout", "service"] = "none"
    path: str = Field(default=".legation/logs/access-{node}.jsonl", min_length=1)

    @field_validator("path")
    @classmethod
    def _path(cls, path: str) -> str:
        if "\0" in path or "\n" in path:
            raise ValueError("a path has no NUL or newline")
        if path.replace("{node}", "").count("{") or path.replace("{node}", "").count("}"):
            raise ValueError("the only placeholder is {node}")
        return path

    def path_for(self, node_id: str) -> str:
        return self.path.replace("{node}", node_id)


class AccessLogService(GrpcService):
    """The access-log service: where it listens, how often Envoy flushes its batches, and the
    JSON access log per proxy (see the module's docstring)."""

    flush_interval: Duration = Field(default="1s", validate_default=True)
    log: JsonLog = Field(default_factory=JsonLog)
    proxies: dict[str, JsonLog] = Field(default_factory=dict)

    @field_validator("flush_interval")
    @classmethod
    def _flush(cls, value: timedelta) -> timedelta:
        if not timedelta(milliseconds=10) <= value <= timedelta(seconds=60):
            raise ValueError("must be between 10ms and 60s")
        return value

    @field_validator("workers")
    @classmethod
    def _one_worker(cls, value: int | None) -> int | None:
        if value is not None and value > 1:
            raise ValueError(
                "must be 1: the access-log service keeps the golden metrics in one process"
            )
        return value

    def worker_count(self) -> int:
        """One process: it aggregates the golden metrics and writes the access-log files."""
        return 1

    def log_of(self, node_id: str) -> JsonLog:
        """The JSON log of proxy ``node_id``: its own entry, else ``log``."""
        return self.proxies.get(node_id, self.log)
