"""The docker compose stack: generated from the quickstart, schema-checked, its Envoy configs
validated by the real Envoy. No Docker engine runs here, so the stack itself is not started."""

from __future__ import annotations

import os
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
    # docker-compose is Python too: a PYTHONPATH holding this repository (whose `compose`
    # package shadows docker-compose's own) would break it
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [binary, "-f", str(COMPOSE), "config", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    assert {"control-plane", "redis", "opa", "gateway-ingress", "jaeger", "prometheus"} <= set(
        services
    )


def test_service_files_validate() -> None:
    """The control plane container runs the request-path services: their files must load."""
    from legation.services import plan

    path = generate.OUT / "mesh.yaml"
    planned = plan(load_mesh(path), mesh_path=path)
    assert set(planned.embedded) == {"extauthz", "extproc", "ratelimit", "accesslog"}


def test_request_path_services_accept_only_mesh_proxies(tmp_path: Path) -> None:
    """Strict mTLS: the embedded services serve mTLS (client certificates from the mesh CA) and
    every proxy's cluster to them originates it with its workload certificate, pinning the
    service's SPIFFE id."""
    from envoy.extensions.transport_sockets.tls.v3 import tls_pb2

    from legation.certs import MeshIssuer
    from legation.services import plan
    from legation.translate import translate
    from legation.xds.types import ResourceType

    path = generate.OUT / "mesh.yaml"
    mesh = load_mesh(path)
    assert mesh.mtls.mode == "strict"
    planned = plan(mesh, mesh_path=path)
    assert {kind: spec.tls for kind, spec in planned.embedded.items()} == {
        "extauthz": True,
        "extproc": True,
        "ratelimit": True,
        "accesslog": True,
    }
    issuer = MeshIssuer(mesh_dir=tmp_path, default_ca_dir=tmp_path / "ca")
    issuer.update(
        mesh.model_copy(update={"mtls": mesh.mtls.model_copy(update={"ca_dir": None})}),
        services={k: s.host for k, s in planned.embedded.items()},
    )
    assert set(issuer.service_certs) == {"extauthz", "extproc", "ratelimit", "accesslog"}
    snapshots = translate(mesh, version="compose", secrets=issuer.secrets())
    assert set(snapshots) == {p.node_id for p in mesh.proxies()}
    for node, snap in snapshots.items():
        for kind in ("extauthz", "extproc", "ratelimit", "accesslog"):
            cluster = snap.resources(ResourceType.CLUSTER)[f"legation|{kind}"].message
            context = tls_pb2.UpstreamTlsContext()
            assert cluster.transport_socket.typed_config.Unpack(context), (node, kind)
            combined = context.common_tls_context.combined_validation_context
            sans = combined.default_validation_context.match_typed_subject_alt_names
            assert [m.matcher.exact for m in sans] == [
                f"spiffe://cluster.local/ns/default/sa/legation-{kind}"
            ]


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
@pytest.mark.parametrize(
    "bootstrap", sorted((generate.OUT / "envoy").glob("*.yaml")), ids=lambda p: p.stem
)
def test_envoy_accepts_each_bootstrap(bootstrap: Path, tmp_path: Path) -> None:
    """Validated with a real credential where the container mounts the proxy's volume (Envoy
    checks that the watched SDS file exists)."""
    from legation.certs.ca import CertificateAuthority
    from legation.certs.enrol import Enrolments, enrol

    ca = CertificateAuthority.in_directory(tmp_path / "ca", trust_domain="cluster.local")
    enrol(ca, Enrolments.beside(tmp_path / "ca"), bootstrap.stem, tmp_path / "xds")
    text = bootstrap.read_text()
    assert generate.CREDENTIALS_DIR in text
    local = tmp_path / "envoy.yaml"
    local.write_text(text.replace(generate.CREDENTIALS_DIR, str(tmp_path / "xds")))
    done = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(local)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "configuration" in done.stdout and "OK" in done.stdout


def test_xds_is_mtls_with_one_credential_volume_per_proxy() -> None:
    doc = yaml.safe_load(COMPOSE.read_text())
    services = doc["services"]
    compose = load_mesh(generate.OUT / "mesh.yaml")
    nodes = [p.node_id for p in compose.proxies()]
    for node in nodes:
        mounts = services[node]["volumes"]
        secrets = [m for m in mounts if m.startswith("xds-") or "legation-ca" in m]
        assert secrets == [f"xds-{node}:{generate.CREDENTIALS_DIR}:ro"]  # its own, nothing else
        boot = yaml.safe_load((generate.OUT / "envoy" / f"{node}.yaml").read_text())
        xds = boot["static_resources"]["clusters"][0]
        assert xds["transport_socket"]["name"] == "envoy.transport_sockets.tls"
    assert {f"xds-{n}" for n in nodes} <= set(doc["volumes"])
    enrol = services["enrol"]
    assert all(f"xds-{n}:/nodes/{n}" in enrol["volumes"] for n in nodes)
    assert "legation bootstrap" in enrol["command"][-1]
    # nobody but the control plane and the one-shot enrolment sees the CA
    holders = {
        name
        for name, svc in services.items()
        if any("legation-ca" in m for m in svc.get("volumes", []))
    }
    assert holders == {"enrol", "control-plane"}


def test_redis_needs_a_password_from_a_secret_and_has_maxmemory() -> None:
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    redis = " ".join(services["redis"]["command"])
    assert "requirepass" in redis and generate.REDIS_SECRET in redis
    assert f"maxmemory {generate.REDIS_MAXMEMORY}" in redis and "maxmemory-policy" in redis
    mesh = load_mesh(generate.OUT / "mesh.yaml")
    assert mesh.ratelimit is not None and mesh.ratelimit.redis_url is not None
    assert f":{generate.REDIS_PASSWORD_PLACEHOLDER}@" in mesh.ratelimit.redis_url
    assert generate.REDIS_SECRET in " ".join(services["control-plane"]["command"])


def test_no_secret_material_is_committed() -> None:
    for path in generate.OUT.rglob("*"):
        if path.is_file() and path.suffix in (".yaml", ".txt", ""):
            assert "PRIVATE KEY" not in path.read_text(errors="replace"), path


def test_each_request_path_service_is_a_container_following_its_own_plan() -> None:
    """As in `legation up`: the services outlive the control plane. Each one's container
    follows the plan published into a volume of its own (read-only there), which only the
    control plane (and the one-shot enrolment, to own it) also mount; each restarts on exit."""
    doc = yaml.safe_load(COMPOSE.read_text())
    services = doc["services"]
    mesh = load_mesh(generate.OUT / "mesh.yaml")
    for kind in ("extauthz", "extproc", "ratelimit"):
        container = services[f"legation-{kind}"]
        plan = f"{generate.SERVICES_DIR}/{kind}/plan.json"
        assert f"legation serve {kind} --plan {plan}" in container["command"][-1]
        assert f"svc-{kind}:{generate.SERVICES_DIR}/{kind}:ro" in container["volumes"]
        assert container["restart"] == "unless-stopped"
        block = getattr(mesh, kind)
        assert container["networks"]["legation"]["ipv4_address"] == block.host
        holders = {
            name
            for name, svc in services.items()
            if any(m.startswith(f"svc-{kind}:") for m in svc.get("volumes", []))
        }
        assert holders == {"enrol", "control-plane", f"legation-{kind}"}
    assert f"--services-dir {generate.SERVICES_DIR}" in services["control-plane"]["command"][-1]
    assert services["control-plane"]["restart"] == "unless-stopped"


def test_spans_go_to_jaeger_and_prometheus_scrapes_every_proxy() -> None:
    """The quickstart's embedded trace receiver becomes the Jaeger container; Prometheus scrapes
    the control plane (its status endpoint on the compose network) and every Envoy's admin."""
    mesh = load_mesh(generate.OUT / "mesh.yaml")
    assert mesh.tracing is not None and not mesh.tracing.embedded
    assert mesh.tracing.address() == (generate.IPS["jaeger"], 4317)
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    assert services["jaeger"]["environment"] == {"COLLECTOR_OTLP_ENABLED": "true"}
    assert services["jaeger"]["networks"]["legation"]["ipv4_address"] == generate.IPS["jaeger"]
    assert "--status-host 0.0.0.0" in services["control-plane"]["command"][-1]
    scrape = yaml.safe_load((generate.OUT / "prometheus.yml").read_text())["scrape_configs"]
    jobs = {job["job_name"]: job["static_configs"][0]["targets"] for job in scrape}
    assert jobs["legation"] == [f"{generate.IPS['control-plane']}:{generate.STATUS_PORT}"]
    assert len(jobs["envoy"]) == len(mesh.proxies())
    assert (
        f"{generate.IPS['gateway']}:{mesh.gateway.admin_port if mesh.gateway else 0}"
        in (jobs["envoy"])
    )
    # each demo app calls through its own sidecar's outbound listener (?call=)
    frontend = services["frontend-0"]["command"]
    outbound = frontend[frontend.index("--outbound") + 1]
    assert outbound == f"{services['frontend-0']['networks']['legation']['ipv4_address']}:15201"
