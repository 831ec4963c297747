"""The quickstart mesh translates into configs the real Envoy accepts, for every proxy, and its
gateway routes show what the quickstart promises. (Its fixed ports are left free: Envoy only
validates here; test_mesh_behaviour.py runs the same features on free ports.)"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from legation.certs import MeshIssuer
from legation.config import load_mesh
from legation.config.capture import with_capture
from legation.envoy_process import envoy_binary
from legation.translate import translate
from legation.translate.static import static_bootstrap
from legation.xds.types import ResourceType

pytestmark = pytest.mark.integration

QUICKSTART = Path(__file__).parents[2] / "examples" / "quickstart" / "mesh.yaml"


@pytest.mark.parametrize("capture", [False, True], ids=["explicit", "capture"])
def test_every_quickstart_proxy_config_validates_in_envoy(tmp_path: Path, capture: bool) -> None:
    mesh = load_mesh(QUICKSTART)
    if capture:  # `legation up --capture`: pods, original-destination listeners, the relay
        mesh = with_capture(mesh, source=str(QUICKSTART))
    secrets = None
    if mesh.mtls.enabled:  # certificates from a throw-away CA, inlined as static secrets
        issuer = MeshIssuer(mesh_dir=tmp_path, default_ca_dir=tmp_path / "ca")
        issuer.update(
            mesh.model_copy(
                update={
                    "mtls": mesh.mtls.model_copy(
                        update={"ca_dir": None, "ca_cert": None, "ca_key": None}
                    )
                }
            )
        )
        secrets = issuer.secrets()
    snapshots = translate(mesh, version="quickstart", secrets=secrets)
    assert sorted(snapshots) == sorted(p.node_id for p in mesh.proxies())
    (tmp_path / ".legation" / "logs").mkdir(parents=True)  # the access logs' folder, as `up` makes
    for proxy in mesh.proxies():
        config = static_bootstrap(
            snapshots[proxy.node_id], node_id=proxy.node_id, admin_port=proxy.admin_port
        )
        path = tmp_path / f"{proxy.node_id}.yaml"
        path.write_text(yaml.safe_dump(config))
        result = subprocess.run(
            [
                envoy_binary(),
                "--mode",
                "validate",
                "-c",
                str(path),
                "--use-dynamic-base-id",
                "--log-level",
                "error",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            cwd=tmp_path,  # where `legation up` runs: relative access-log paths start here
        )
        assert result.returncode == 0, f"{proxy.node_id}: {result.stdout}{result.stderr}"
        listeners = snapshots[proxy.node_id].resources(ResourceType.LISTENER)
        assert sorted(listeners) == sorted(ls.name for ls in proxy.listeners)


def test_quickstart_gateway_routes_show_the_features() -> None:
    gateway = translate(load_mesh(QUICKSTART), version="q")["gateway-ingress"]
    (vhost,) = gateway.resources(ResourceType.ROUTE)["gateway"].message.virtual_hosts
    routes = {r.name: r for r in vhost.routes}
    header = routes["reviews-v2-by-header"]
    assert header.match.headers[0].name == "x-version"
    assert header.route.cluster == "outbound|reviews|v2"
    canary = routes["reviews-canary"].route.weighted_clusters.clusters
    assert {(c.name, c.weight.value) for c in canary} == {
        ("outbound|reviews|v1", 90),
        ("outbound|reviews|v2", 10),
    }
    assert routes["reviews-flaky-retried"].route.retry_policy.retry_on == "5xx"
    assert "envoy.filters.http.fault" in routes["ratings-fault"].typed_per_filter_config
    # routes are tried in order: the specific ones come before the catch-all
    assert [r.name for r in vhost.routes][-1] == "frontend"
