"""The quickstart mesh and ext_authz config as the compose stack runs them: container addresses,
strict mTLS with the CA on a volume, one process per service container, Redis counters, OPA for
Rego, spans to Jaeger. Used by :mod:`compose.generate`."""

from __future__ import annotations

import copy
from typing import Any

from legation.services import kinds

SUBNET = "172.30.0.0/24"
ENVOY_IMAGE = "envoyproxy/envoy:v1.40-latest"
IPS = {
    "control-plane": "172.30.0.2",
    "gateway": "172.30.0.3",
    "redis": "172.30.0.4",
    "opa": "172.30.0.5",
    "extauthz": "172.30.0.6",
    "extproc": "172.30.0.7",
    "ratelimit": "172.30.0.8",
    "accesslog": "172.30.0.9",
    "jaeger": "172.30.0.40",
    "prometheus": "172.30.0.41",
}
STATUS_PORT = 18001
CA_DIR = "/var/lib/legation/ca"
SERVICES_DIR = "/var/lib/legation/services"  # one volume per service below it
CREDENTIALS_DIR = "/etc/legation/xds"  # a proxy's own volume, inside its Envoy container
REDIS_SECRET = "/run/legation-secret/redis_password"
REDIS_PASSWORD_PLACEHOLDER = "__REDIS_PASSWORD__"  # not a secret: substituted at start-up
REDIS_MAXMEMORY = "64mb"
APP_BASE = 10  # apps get 172.30.0.10 and up


def compose_mesh(raw: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """The quickstart mesh with container addresses; and app container name -> address."""
    mesh = copy.deepcopy(raw)
    mesh["xds"] = {"host": IPS["control-plane"], "port": raw.get("xds", {}).get("port", 18000)}
    if "gateway" in mesh:
        mesh["gateway"]["host"] = "0.0.0.0"
    apps: dict[str, str] = {}
    for service in mesh.get("services", []):
        for i, endpoint in enumerate(service.get("endpoints", [])):
            name = endpoint.get("name") or f"{service['name']}-{i}"
            address = f"172.30.0.{APP_BASE + len(apps)}"
            apps[name] = address
            endpoint["host"] = address
    for block in kinds.names():
        if block in mesh:
            mesh[block]["host"] = IPS[block]  # a container of its own
            mesh[block]["tls"] = "mesh"  # reachable by every container: proxies only (mTLS)
            mesh[block]["workers"] = 1  # its container runs one `serve --plan` process
    # strict mTLS, whatever the quickstart says; the CA (for xDS and mTLS) lives on a volume
    # the control plane can write
    mesh.setdefault("mtls", {}).update(mode="strict", ca_dir=CA_DIR)
    if "accesslog" in mesh:  # JSON access-log lines to the Envoy containers' logs
        mesh["accesslog"]["log"] = {"to": "stdout"}
    if "tracing" in mesh:  # spans to the Jaeger container (OTLP/gRPC), not the embedded receiver
        mesh["tracing"] = {
            "collector": f"{IPS['jaeger']}:4317",
            "sampling": mesh["tracing"].get("sampling", 100.0),
        }
    if "ratelimit" in mesh:
        mesh["ratelimit"]["backend"] = "redis"
        mesh["ratelimit"]["redis_url"] = (
            f"redis://:{REDIS_PASSWORD_PLACEHOLDER}@{IPS['redis']}:6379/0"
        )
    return mesh, apps


def authz_config(raw: dict[str, Any]) -> dict[str, Any]:
    """The quickstart's ext_authz config with the embedded Rego check replaced by OPA."""
    config = copy.deepcopy(raw)
    renamed = {}
    for name, check in raw.get("checks", {}).items():
        if check.get("type") == "rego":
            del config["checks"][name]
            config["checks"]["opa"] = {
                "type": "opa",
                "options": {"url": f"http://{IPS['opa']}:8181"},
            }
            renamed[name] = "opa"
    if "default_checks" in config:
        config["default_checks"] = [renamed.get(c, c) for c in config["default_checks"]]
    return config
