"""The mesh's mutual TLS: encryption between proxies and a SPIFFE identity for each of them.

::

    mtls:
      mode: strict            # off (default) | permissive | strict
      trust_domain: cluster.local
      namespace: default      # the mesh's name in SPIFFE ids
      cert_ttl: 24h           # workload certificates; renewed at 2/3 of their lifetime
      ca_dir: .legation/ca    # where the generated root lives (relative to the mesh file)
      # or a root of your own (both, relative to the mesh file; never with ca_dir):
      # ca_cert: ca.crt
      # ca_key: ca.key

``strict``: sidecar inbound listeners accept only TLS connections with a client certificate from
the mesh's CA. ``permissive``: they also accept plaintext (for clients outside the mesh). In both,
proxies send mTLS to sidecars and check the server's SPIFFE id. Identities:
``spiffe://<trust_domain>/ns/<namespace>/sa/<service or gateway name>`` (see
:mod:`legation.certs.spiffe`). Without ``ca_dir``/``ca_cert``, the control plane keeps its root in
``.legation/ca`` under its working directory.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, Field, field_validator

from legation.config._types import STRICT, Duration, Name
from legation.config.errors import Problem

if TYPE_CHECKING:
    from legation.config.model import Mesh

_TRUST_DOMAIN = re.compile(r"^[a-z0-9]([a-z0-9._-]*[a-z0-9])?$")
MIN_TTL = timedelta(seconds=10)
MAX_TTL = timedelta(days=365)


class Mtls(BaseModel):
    model_config = STRICT
    mode: Literal["off", "permissive", "strict"] = "off"
    trust_domain: str = "cluster.local"
    namespace: Name = "default"
    cert_ttl: Duration = timedelta(hours=24)
    ca_dir: str | None = Field(default=None, min_length=1)
    ca_cert: str | None = Field(default=None, min_length=1)
    ca_key: str | None = Field(default=None, min_length=1)

    @field_validator("mode", mode="before")
    @classmethod
    def _yaml_booleans(cls, value: Any) -> Any:
        """YAML 1.1 reads an unquoted ``off`` as false (and ``on`` as true)."""
        if value is False:
            return "off"
        if value is True:
            raise ValueError(
                "expected 'off', 'permissive' or 'strict', got on/true (YAML reads it as a boolean)"
            )
        return value

    @field_validator("trust_domain")
    @classmethod
    def _trust_domain(cls, value: str) -> str:
        if len(value) > 255 or not _TRUST_DOMAIN.match(value):
            raise ValueError(
                f"expected a trust domain (lower-case letters, digits, '.', '-', '_'), "
                f"got {value!r}"
            )
        return value

    @property
    def enabled(self) -> bool:
        return self.mode != "off"


def mtls_problems(mesh: Mesh) -> Iterator[Problem]:
    m = mesh.mtls
    if not MIN_TTL <= m.cert_ttl <= MAX_TTL:
        yield Problem("mtls.cert_ttl", "must be between 10s and 365 days")
    if (m.ca_cert is None) != (m.ca_key is None):
        given, missing = ("ca_cert", "ca_key") if m.ca_key is None else ("ca_key", "ca_cert")
        yield Problem(f"mtls.{given}", f"needs mtls.{missing} too")
    if m.ca_dir is not None and (m.ca_cert is not None or m.ca_key is not None):
        yield Problem("mtls.ca_dir", "give either ca_dir or ca_cert and ca_key, not both")
    if m.enabled and mesh.gateway is not None and mesh.service(mesh.gateway.name) is not None:
        yield Problem(
            "gateway.name",
            f"a service is also named {mesh.gateway.name!r}: with mTLS they would share a "
            "SPIFFE identity",
        )
