"""The docker compose stack: generated from the quickstart, schema-checked, its Envoy configs
validated by the real Envoy. No Docker engine runs here, so the stack itself is not started."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from compose import generate
from legation.config import load_mesh
from legation.envoy_process import envoy_binary

COMPOSE = generate.OUT / "docker-compose.yaml"


def test_generated_files_are_up_to_date() -> None:
    for path, text in generate.render().items():
        assert path.is_file(), f"{path} missing: run python -m compose.generate"
        assert path.read_text() == text, f"{path} is stale: run python -m compose.generate"


def test_compose_file_passes_docker_compose_schema_check() -> None:
    binary = shutil.which("docker-compose")
    assert binary, "docker-compose (Debian package) is needed; `make test` installs it"
    done = subprocess.run([binary, "-f", str(COMPOSE), "config", "-q"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    assert {"control-plane", "redis", "opa", "gateway-ingress"} <= set(services)


def test_service_files_validate() -> None:
    """The control plane container runs the request-path services: their files must load."""
    from legation.services import plan

    path = generate.OUT / "mesh.yaml"
    planned = plan(load_mesh(path), mesh_path=path)
    assert set(planned.embedded) == {"extauthz", "extproc", "ratelimit"}


def test_same_topology_as_the_quickstart() -> None:
    quick = load_mesh(generate.QUICKSTART / "mesh.yaml")
    compose = load_mesh(generate.OUT / "mesh.yaml")
    assert [p.node_id for p in compose.proxies()] == [p.node_id for p in quick.proxies()]
    assert [r.model_dump() for r in compose.routes] == [r.model_dump() for r in quick.routes]
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    for proxy in compose.proxies():
        if proxy.kind == "sidecar":
            assert services[proxy.node_id]["network_mode"] == f"service:{proxy.instance}"


@pytest.mark.integration
@pytest.mark.parametrize("bootstrap", sorted((generate.OUT / "envoy").glob("*.yaml")),
                         ids=lambda p: p.stem)
def test_envoy_accepts_each_bootstrap(bootstrap: Path) -> None:
    done = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(bootstrap)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "configuration" in done.stdout and "OK" in done.stdout
