"""The example plugin package, discovered through its entry point and run through the real Envoy.

CI installs from scratch, so the package is not pip-installed here: its ``src`` goes on sys.path and
a temporary ``*.dist-info`` with its ``entry_points.txt`` makes importlib.metadata discover it, as
an installed distribution would be.
"""

from __future__ import annotations

import importlib
import json
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from legation import plugins
from legation.envoy_process import EnvoyProcess
from legation.errors import ConfigError
from legation.extproc.config import build_chains
from legation.extproc.service import Settings
from tests.conftest import free_port
from tests.extproc import harness

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "extproc-plugin"


@pytest.fixture
def installed_example(tmp_path: Path) -> Iterator[None]:
    dist = tmp_path / "legation_maintenance-0.1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: legation-maintenance\nVersion: 0.1.0\n"
    )
    project = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["project"]
    lines = [
        f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items())
        for group, eps in project["entry-points"].items()
    ]
    (dist / "entry_points.txt").write_text("\n".join(lines))
    added = [str(EXAMPLE / "src"), str(tmp_path)]
    sys.path[:0] = added
    importlib.invalidate_caches()
    try:
        yield
    finally:
        for p in added:
            sys.path.remove(p)
        sys.modules.pop("legation_maintenance", None)
        importlib.invalidate_caches()


def test_discovered_through_the_entry_point(installed_example):
    assert "maintenance" in plugins.available("extproc.filter")


def test_options_are_validated_by_the_plugin(installed_example):
    with pytest.raises(ConfigError) as info:
        build_chains(
            {
                "chains": {
                    "web": {
                        "filters": [
                            {"name": "maintenance", "options": {"paths": ["/a"], "retry_after": 0}}
                        ]
                    }
                }
            },
            source="mesh.yaml",
        )
    assert str(info.value) == (
        "mesh.yaml: chains.web.filters[0].options.retry_after: Input should be greater than 0"
    )


@pytest.mark.integration
def test_example_filter_through_envoy(installed_example, demo_factory, tmp_path):
    chains = build_chains(
        {
            "chains": {
                "maint": {
                    "filters": [
                        {
                            "name": "maintenance",
                            "options": {
                                "paths": ["/admin"],
                                "retry_after": 120,
                                "bypass_header": "x-operator",
                            },
                        }
                    ]
                }
            }
        }
    )
    app = demo_factory("app")
    service = harness.ServiceThread(Settings(chains=chains, registry=CollectorRegistry()))
    service.start()
    port, admin = free_port(), free_port()
    boot = harness.bootstrap(
        listener_port=port,
        admin_port=admin,
        service_port=service.port,
        routes=[harness.route("/", "app", chains.chains["maint"])],
        clusters=[harness.static_cluster("app", app.port)],
        message_timeout=1.0,
    )
    envoy = EnvoyProcess(
        json.dumps(boot), admin_port=admin, name="extproc-example", log_dir=tmp_path
    )
    try:
        envoy.start()
        envoy.wait_live()
        down = harness.request(port, "/admin/users")
        assert down.status == 503
        assert down.headers["retry-after"] == "120"
        assert down.body == b"down for maintenance\n"
        assert "/admin/users" not in app.paths
        bypass = harness.request(port, "/admin/users", headers={"x-operator": "1"})
        assert bypass.status == 200 and bypass.json()["path"] == "/admin/users"
        assert harness.request(port, "/public").status == 200
    finally:
        envoy.stop()
        service.stop()
