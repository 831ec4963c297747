"""The `legation` command, run as a user runs it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import grpc
import pytest
import yaml
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2 as common_rl
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from legation import _loop
from tests.conftest import free_port, worker_base_port
from tests.ratelimit.conftest import RedisServer, needs_redis

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "examples" / "quickstart" / "mesh.yaml"


def legation(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "legation.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def test_check_accepts_the_quickstart() -> None:
    done = legation("check", str(QUICKSTART))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"{QUICKSTART}: ok (3 services, ")


def test_check_names_file_and_field_of_every_bad_fixture() -> None:
    bad = ROOT / "tests" / "config" / "bad" / "unknown_service.yaml"
    done = legation("check", str(QUICKSTART), str(bad))
    assert done.returncode == 1
    assert done.stderr.startswith(f"{bad}: routes[")
    assert "unknown service" in done.stderr


def test_bootstrap_takes_identity_from_the_mesh(tmp_path: Path) -> None:
    done = legation(
        "bootstrap",
        "--node",
        "gateway-ingress",
        "--mesh",
        str(QUICKSTART),
        "--ca-dir",
        str(tmp_path / "ca"),
    )
    assert done.returncode == 0, done.stderr
    doc = yaml.safe_load(done.stdout)
    assert doc["node"] == {"id": "gateway-ingress", "cluster": "ingress"}
    assert doc["admin"]["address"]["socket_address"]["port_value"] == 19000
    assert doc["dynamic_resources"]["ads_config"]["api_type"] == "GRPC"
    xds = doc["static_resources"]["clusters"][0]["load_assignment"]["endpoints"][0]
    assert xds["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]["port_value"] == 18000


def test_bootstrap_writes_the_nodes_credential_and_points_the_xds_cluster_at_it(
    tmp_path: Path,
) -> None:
    import stat

    creds = tmp_path / "creds"
    args = (
        "bootstrap",
        "--node",
        "edge-1",
        "--ca-dir",
        str(tmp_path / "ca"),
        "--credentials-dir",
        str(creds),
    )
    done = legation(*args)
    assert done.returncode == 0, done.stderr
    assert "PRIVATE" not in done.stdout + done.stderr
    assert stat.S_IMODE(creds.stat().st_mode) == 0o700
    assert stat.S_IMODE((creds / "xds-client.yaml").stat().st_mode) == 0o600
    assert "PRIVATE KEY" in (creds / "xds-client.yaml").read_text()
    tls = yaml.safe_load(done.stdout)["static_resources"]["clusters"][0]["transport_socket"]
    context = tls["typed_config"]["common_tls_context"]
    sds = context["tls_certificate_sds_secret_configs"][0]["sds_config"]["path_config_source"]
    assert sds == {
        "path": str(creds / "xds-client.yaml"),
        "watched_directory": {"path": str(creds)},
    }
    assert context["validation_context"]["trusted_ca"] == {"filename": str(creds / "ca.crt")}
    # run again: the current credential is kept; --rotate replaces (and revokes) it
    before = (creds / "xds-client.yaml").read_bytes()
    assert legation(*args).returncode == 0
    assert (creds / "xds-client.yaml").read_bytes() == before
    rotated = legation(*args, "--rotate")
    assert rotated.returncode == 0 and "revoked" in rotated.stderr
    assert (creds / "xds-client.yaml").read_bytes() != before
    # with the example's placeholder directory, the output is envoy/bootstrap.yaml
    example = yaml.safe_load((ROOT / "envoy" / "bootstrap.yaml").read_text())
    ours = yaml.safe_load(
        legation(
            "bootstrap",
            "--node",
            "example-proxy",
            "--cluster",
            "example",
            "--admin-port",
            "9901",
            "--ca-dir",
            str(tmp_path / "ca"),
            "--credentials-dir",
            str(creds),
        ).stdout
    )
    assert yaml.safe_dump(ours).replace(
        str(creds), "/etc/legation/xds/example-proxy"
    ) == yaml.safe_dump(example)


def test_bootstrap_delta_and_unknown_node(tmp_path: Path) -> None:
    done = legation(
        "bootstrap",
        "--node",
        "edge-1",
        "--xds",
        "10.0.0.5:18000",
        "--delta",
        "--ca-dir",
        str(tmp_path / "ca"),
    )
    doc = yaml.safe_load(done.stdout)
    assert doc["dynamic_resources"]["ads_config"]["api_type"] == "DELTA_GRPC"
    assert doc["static_resources"]["clusters"][0]["type"] == "STATIC"
    missing = legation(
        "bootstrap", "--node", "nope", "--mesh", str(QUICKSTART), "--ca-dir", str(tmp_path / "ca")
    )
    assert missing.returncode == 2
    assert "no proxy with node id 'nope'" in missing.stderr


def test_status_without_a_running_stack_says_so() -> None:
    done = legation("status", "--url", f"http://127.0.0.1:{free_port()}")
    assert done.returncode == 1
    assert "is `legation up` running?" in done.stderr


def test_serve_ratelimit_in_memory_refuses_several_workers() -> None:
    done = legation("serve", "ratelimit", "--workers", "2")
    assert done.returncode == 2
    assert "the memory backend counts in one process" in done.stderr


@needs_redis
@pytest.mark.integration
def test_serve_with_two_workers_on_port_and_port_plus_100(tmp_path: Path) -> None:
    """Two forked workers, worker i on port + 100 i; their metrics merged on the parent's one
    endpoint (the rate limiter on Redis: shared counters, so several workers may count)."""
    config = tmp_path / "limits.yaml"
    config.write_text(
        "domain: cli\ndescriptors:\n  - key: user\n    rate_limit: {unit: minute, "
        "requests_per_unit: 1}\n"
    )
    redis = RedisServer(tmp_path)
    port, metrics = worker_base_port(2), free_port()
    command = [sys.executable, "-m", "legation.cli", "serve", "ratelimit", "--workers", "2"]
    command += ["--config", str(config), "--listen", f"127.0.0.1:{port}"]
    command += ["--backend", "redis", "--redis-url", redis.url, "--metrics-port", str(metrics)]
    proc = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
        start_new_session=True,  # its workers in its group: killed with it if the read hangs
    )
    try:
        assert proc.stdout is not None
        started: list[str] = []
        guard = threading.Timer(30, lambda: os.killpg(proc.pid, signal.SIGKILL))
        guard.start()
        for line in proc.stdout:
            if line.startswith("ratelimit (pid "):
                started.append(line.strip())
            if len(started) == 2:
                break
        guard.cancel()
        assert sorted(line.rsplit(":", 1)[1] for line in started) == sorted(
            [str(port), str(port + 100)]
        ), started
        assert len({line.split("pid ")[1].split(",")[0] for line in started}) == 2
        assert all(f", {_loop.choice()}) on " in line for line in started), started  # its loop
        request = rls_pb2.RateLimitRequest(
            domain="cli",
            descriptors=[
                common_rl.RateLimitDescriptor(
                    entries=[common_rl.RateLimitDescriptor.Entry(key="user", value="ann")]
                )
            ],
        )
        codes = []
        for each in (port, port + 100) * 3:
            with grpc.insecure_channel(f"127.0.0.1:{each}") as channel:
                stub = rls_pb2_grpc.RateLimitServiceStub(channel)
                codes.append(stub.ShouldRateLimit(request, timeout=5).overall_code)
        assert codes.count(rls_pb2.RateLimitResponse.OK) == 1  # one a minute, across workers
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        samples = [s for f in text_string_to_metric_families(text) for s in f.samples]

        def values(name: str) -> list[tuple[dict[str, str], float]]:
            return [(s.labels, s.value) for s in samples if s.name == name]

        assert values("legation_workers_scraped") == [({}, 2.0)]
        # a counter is summed over the workers: every request once
        assert sum(v for _, v in values("legation_ratelimit_total_hits_total")) == 6
        assert len(values("legation_ratelimit_total_hits_total")) == 1
        # a gauge stays per worker
        memory = values("process_resident_memory_bytes")
        assert sorted(labels["worker"] for labels, _ in memory) == ["0", "1"]
    finally:
        proc.terminate()
        assert proc.wait(15) == 0
        if proc.stdout is not None:
            proc.stdout.close()
        redis.stop()


def test_check_reads_the_request_path_services_files(tmp_path: Path) -> None:
    mesh = tmp_path / "mesh.yaml"
    mesh.write_text(QUICKSTART.read_text())
    (tmp_path / "authz.yaml").write_text(
        "checks: {rego: {type: rego, options: {policy_dir: x}}}\ndefualt_checks: [rego]\n"
    )
    (tmp_path / "ratelimit.yaml").write_text((QUICKSTART.parent / "ratelimit.yaml").read_text())
    done = legation("check", str(mesh))
    assert done.returncode == 1
    assert done.stderr.startswith(f"{mesh}: extauthz.config: ")
    assert "defualt_checks" in done.stderr
