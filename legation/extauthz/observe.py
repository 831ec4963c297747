"""Metrics (prometheus_client, on a registry the caller passes) and the JSON-lines decision log.

The decision log never sees a token: it records the path without its query string, the policy,
the checks, the result and the latency, and nothing from headers or cookies.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import IO, Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram

decision_logger = logging.getLogger("legation.extauthz.decisions")

_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        registry = registry if registry is not None else REGISTRY
        self.decisions = Counter(
            "legation_extauthz_decisions", "ext_authz decisions by policy and result",
            ["policy", "result"], registry=registry,
        )
        self.errors = Counter(
            "legation_extauthz_check_errors", "checks that errored or timed out, by code",
            ["policy", "code"], registry=registry,
        )
        self.latency = Histogram(
            "legation_extauthz_handler_seconds", "time spent in the Check handler",
            ["policy"], buckets=_BUCKETS, registry=registry,
        )

    def observe(self, *, policy: str, result: str, code: str, seconds: float) -> None:
        self.decisions.labels(policy, result).inc()
        if code and result in ("error", "would_deny") and code not in ("denied",):
            self.errors.labels(policy, code).inc()
        self.latency.labels(policy).observe(seconds)


class DecisionLog:
    """Appends one JSON object per decision to a file, or to a logger when ``target`` is "-"."""

    def __init__(self, target: str | None) -> None:
        self._file: IO[str] | None = None
        self._to_logger = target == "-"
        self._lock = threading.Lock()
        if target and target != "-":
            path = Path(target)
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = path.open("a", buffering=1)

    @property
    def enabled(self) -> bool:
        return self._file is not None or self._to_logger

    def write(self, entry: dict[str, Any]) -> None:
        entry = {"time": time.time(), **entry}
        line = json.dumps(entry, separators=(",", ":"))
        if self._to_logger:
            decision_logger.info(line)
        elif self._file is not None:
            with self._lock:
                self._file.write(line + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
