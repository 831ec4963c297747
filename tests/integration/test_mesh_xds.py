"""The whole topology over ADS: the control plane serves translate()'s snapshots to a gateway and
two sidecars (real Envoys); requests cross gateway -> sidecar inbound -> app, and app-side
requests go through a sidecar's outbound listener. A route change reaches Envoy live."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from legation.config import Mesh, parse_mesh
from legation.demo import DemoApp
from legation.embedded import BackgroundControlPlane
from legation.envoy_process import EnvoyProcess
from legation.translate import translate
from legation.translate.bootstrap import bootstrap
from tests.conftest import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def fetch(port: int, path: str, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, {}


def mesh_data(apps: dict[str, DemoApp], header_subset: str) -> dict[str, Any]:
    def ep(app: DemoApp) -> dict[str, Any]:
        return {
            "name": f"reviews-{app.version}",
            "port": app.port,
            "labels": {"version": app.version},
            "sidecar": {
                "inbound_port": free_port(),
                "outbound_port": free_port(),
                "admin_port": free_port(),
            },
        }

    return {
        "gateway": {"port": free_port(), "admin_port": free_port()},
        "services": [
            {
                "name": "reviews",
                "port": 9080,
                "subsets": [
                    {"name": "v1", "labels": {"version": "v1"}},
                    {"name": "v2", "labels": {"version": "v2"}},
                ],
                "endpoints": [ep(apps["v1"]), ep(apps["v2"])],
            }
        ],
        "routes": [
            {
                "name": "by-header",
                "gateway": True,
                "mesh_hosts": ["reviews"],
                "match": {"headers": [{"name": "x-version", "exact": "v2"}]},
                "to": {"service": "reviews", "subset": header_subset},
            },
            {"name": "rest", "to": {"service": "reviews", "subset": "v1"}},
        ],
    }


class Running:
    def __init__(self, data: dict[str, Any], control_plane: BackgroundControlPlane) -> None:
        self.data = data
        self.mesh: Mesh = parse_mesh(yaml.safe_dump(data), source="xds-mesh.yaml")
        self.control_plane = control_plane
        self.envoys: dict[str, EnvoyProcess] = {}

    def publish(self, data: dict[str, Any], version: str) -> None:
        self.data = data
        self.mesh = parse_mesh(yaml.safe_dump(data), source="xds-mesh.yaml")
        for node, snapshot in translate(self.mesh, version=version).items():
            self.control_plane.set_snapshot(node, snapshot)


@pytest.fixture
def running(tmp_path: Path) -> Iterator[Running]:
    apps = {v: DemoApp(name="reviews", version=v).start_in_thread() for v in ("v1", "v2")}
    control_plane = BackgroundControlPlane(ca_dir=tmp_path / "ca", debounce=0.01).start()
    data = mesh_data(apps, header_subset="v2")
    data["xds"] = {"port": control_plane.port}
    world = Running(data, control_plane)
    try:
        world.publish(data, "1")
        for proxy in world.mesh.proxies():
            config = bootstrap(
                node_id=proxy.node_id,
                node_cluster=proxy.node_cluster,
                xds_host="127.0.0.1",
                xds_port=control_plane.port,
                admin_port=proxy.admin_port,
                credentials_dir=control_plane.enrol(proxy.node_id).directory,
            )
            envoy = EnvoyProcess(config, admin_port=proxy.admin_port, name=proxy.node_id)
            world.envoys[proxy.node_id] = envoy.start()
        for envoy in world.envoys.values():
            envoy.wait_live()
        yield world
    finally:
        for envoy in world.envoys.values():
            envoy.stop()
        control_plane.close()
        for app in apps.values():
            app.stop_thread()


def test_gateway_to_sidecar_to_app_and_mesh_traffic(running: Running) -> None:
    gw = running.mesh.gateway
    assert gw is not None
    status, body = fetch(gw.port, "/reviews", {"x-version": "v2"})
    assert (status, body["version"]) == (200, "v2")
    status, body = fetch(gw.port, "/reviews", {})
    assert (status, body["version"]) == (200, "v1")
    # it went through v2's sidecar inbound listener
    v2_sidecar = running.envoys["sidecar-reviews-v2"]
    inbound = v2_sidecar.stats(r"^http\.inbound_reviews\.downstream_rq_total$")
    assert inbound["http.inbound_reviews.downstream_rq_total"] >= 1
    # an app asks its own sidecar's outbound listener for the reviews service, by Host
    outbound_port = running.data["services"][0]["endpoints"][0]["sidecar"]["outbound_port"]
    status, body = fetch(outbound_port, "/reviews", {"host": "reviews", "x-version": "v2"})
    assert (status, body["version"]) == (200, "v2")
    status, _ = fetch(outbound_port, "/reviews", {"host": "unknown"})
    assert status == 404


def test_route_change_reaches_envoy_live(running: Running) -> None:
    gw = running.mesh.gateway
    assert gw is not None
    changed = json.loads(json.dumps(running.data))
    changed["routes"][0]["to"]["subset"] = "v1"
    gateway = running.envoys["gateway-ingress"]
    rds_before = gateway.stats(r"^http\.gateway_ingress\.rds\.gateway\.update_success$")
    running.publish(changed, "2")
    deadline = time.monotonic() + 10
    version = "v2"
    while version != "v1" and time.monotonic() < deadline:
        time.sleep(0.05)
        _, body = fetch(gw.port, "/reviews", {"x-version": "v2"})
        version = body.get("version", "")
    assert version == "v1"
    rds_after = gateway.stats(r"^http\.gateway_ingress\.rds\.gateway\.update_success$")
    key = "http.gateway_ingress.rds.gateway.update_success"
    assert rds_after[key] > rds_before[key]
