"""One bad-config fixture per error, with the exact message asserted (file first, then path)."""

from __future__ import annotations

from pathlib import Path

import pytest

from legation.config import MeshConfigError, load_mesh
from legation.errors import ConfigError

BAD = Path(__file__).parent / "bad"

EXPECTED = {
    "unknown_key": "routes[0].to.subst: unknown key (allowed: service, subset)",
    "wrong_type": "services[0].port: expected an integer, got 'eighty'",
    "unknown_service": "routes[0].to.service: unknown service 'reviws'",
    "duplicate_names": "routes[1].name: duplicate route name 'reviews' (first at routes[0].name)",
    "clashing_ports": (
        "services[0].endpoints[1].sidecar.inbound_port: "
        "port 9111 is already used by services[0].endpoints[0].port"
    ),
    "bad_weights": "routes[0].split: weights sum to 95, not 100",
    "rate_limits_on_redirect": (
        "routes[0].rate_limits: only applies to routes with 'to' or 'split'"
    ),
    "header_route_reserved": (
        "routes[0].filters[0].options: header: Host frames or steers the request; a routing "
        "header needs a name of its own (the client's copy of it is removed before routing)"
    ),
    "bad_filter_option": (
        "routes[0].filters[1].options.rules[0]: "
        "a rule needs exactly one of equals, one_of, present, bucket"
    ),
    "mtls_mode": (
        "mtls.mode: expected 'off', 'permissive' or 'strict', got on/true "
        "(YAML reads it as a boolean)"
    ),
    "mtls_half_ca": "mtls.ca_key: needs mtls.ca_cert too",
    "ratelimit_max_bytes": "ratelimit.max_bytes: must be >= 65536, got 1024",
    "ratelimit_max_keys_with_redis": "ratelimit.max_keys: only used with backend: memory",
    "ratelimit_local_with_memory": (
        "ratelimit.failure_mode: local is only used with backend: redis"
    ),
    "ratelimit_local_instances_alone": (
        "ratelimit.local_instances: only used with failure_mode: local"
    ),
    "ratelimit_header_names_alone": (
        "ratelimit.response_header_names: only used with response_headers: true"
    ),
    "ratelimit_bad_header_name": (
        "ratelimit.response_header_names.remaining: 'X Remaining' is not an HTTP header name "
        "(letters, digits and !#$%&'*+.^_`|~- only)"
    ),
    "ratelimit_quota_mode": "ratelimit.quota_mode: expected true or false, got 'maybe'",
    "ratelimit_memory_workers": (
        "ratelimit.workers: the memory backend counts in one process: more than 1 needs "
        "backend: redis"
    ),
    "worker_ports_clash": "extproc.port: port 18210 is already used by extauthz.workers",
    "workers_zero": "extproc.workers: must be >= 1, got 0",
    "worker_ports_above_65535": (
        "extproc.workers: worker ports reach 65600, above 65535 (worker i: port + 100 i)"
    ),
    "extproc_stream_idle_timeout": (
        "extproc.stream_idle_timeout: invalid duration 'forever': use e.g. 250ms, 2s or 1m"
    ),
    "extauthz_protocol": "extauthz.protocol: expected 'grpc' or 'http', got 'rest'",
    "extauthz_http_without_port": (
        "extauthz.http_port: needed with protocol: http (or http_socket)"
    ),
    "extauthz_http_port_alone": "extauthz.http_port: only used with protocol: http",
    "extauthz_http_socket_alone": "extauthz.http_socket: only used with protocol: http",
    "extauthz_http_socket_relative": (
        "extauthz.http_socket: 'run/a.sock' must be an absolute path (Envoy and the service "
        "resolve it alike)"
    ),
    "extauthz_http_socket_directory": "extauthz.http_socket: '/run/legation/' names a directory",
    "extauthz_http_socket_and_port": (
        "extauthz.http_socket: give http_port or http_socket, not both"
    ),
    "extauthz_http_socket_long": (
        f"extauthz.http_socket: '/{'d' * 120}.sock' is longer than 100 bytes (a Unix socket's "
        "path limit)"
    ),
    "extproc_http_without_port": "extproc.http_port: needed with protocol: http",
    "extproc_http_port_alone": "extproc.http_port: only used with protocol: http",
    "extproc_http_port_clash": "extproc.http_port: port 18111 is already used by extproc.workers",
    "capture_unknown_key": (
        "capture.outbound.exclude_port: unknown key "
        "(allowed: exclude_cidrs, exclude_ports, include_cidrs, include_ports, policy)"
    ),
    "capture_bad_cidr": (
        "capture.cidr: expected an IPv4 CIDR such as 10.0.0.0/8, got '10.213.0.1/16': "
        "10.213.0.1/16 has host bits set"
    ),
    "capture_small_cidr": "capture.cidr: needs a prefix between /8 and /24, got /28",
    "capture_loopback_cidr": "capture.cidr: 127.1.0.0/16 is not a usable private range",
    "capture_public_cidr": (
        "capture.cidr: 8.8.8.0/24 is not a private range (such as 10/8, 172.16/12 or "
        "192.168/16; never public or link-local addresses)"
    ),
    "capture_link_local_cidr": (
        "capture.cidr: 169.254.0.0/16 is not a private range (such as 10/8, 172.16/12 or "
        "192.168/16; never public or link-local addresses)"
    ),
    "capture_port_both": (
        "capture.outbound.exclude_ports: port 443 is also in capture.outbound.include_ports"
    ),
    "capture_root_gid": "capture.proxy_gid: must be >= 1, got 0",
    "capture_app_uid_low": "capture.app_uid_base: must be >= 65536, got 1000",
    "capture_policy": (
        "capture.outbound.policy: expected 'allow_any' or 'registry_only', got 'deny'"
    ),
    "capture_collision": (
        "capture.cidr: service 'svc10' and service 'svc3' both hash to 10.9.0.63: "
        "rename one or widen the range"
    ),
    "tracing_collector": ("tracing.collector: expected 'embedded' or host:port, got 'jaeger'"),
    "tracing_port_with_external": "tracing.port: only used with collector: embedded",
    "tracing_sampling": "tracing.sampling: must be <= 100, got 150",
    "route_tracing_without_block": "routes[0].tracing: needs a tracing block in the mesh",
    "tracing_port_clash": (
        "tracing.port: port 9111 is already used by services[0].endpoints[0].port"
    ),
    "tracing_tls_without_mtls": (
        "tracing.tls: 'mesh' needs mtls.mode permissive or strict (the certificates come "
        "from the mesh CA); or set tls: none"
    ),
    "tracing_tls_with_external": "tracing.tls: only used with collector: embedded",
    "tracing_tls_bad_value": "tracing.tls: expected 'mesh' or 'none', got 'spiffe'",
    "tracing_service_without_tls": (
        "extproc.tls: 'none' leaves the service without a mesh certificate to export its "
        "spans with, and the trace receiver takes mTLS only: set tracing.tls: none too, or "
        "drop tls: none here"
    ),
    "tracing_reserved_name": (
        "services[0].name: 'legation-tracing' is reserved for Legation's trace receiver "
        "(its SPIFFE identity with mTLS)"
    ),
    "accesslog_flush_interval": "accesslog.flush_interval: must be between 10ms and 60s",
    "accesslog_log_to": (
        "accesslog.log.to: expected 'none', 'file', 'stdout' or 'service', got 'syslog'"
    ),
    "accesslog_workers": (
        "accesslog.workers: must be 1: the access-log service keeps the golden metrics in one "
        "process"
    ),
    "accesslog_path_placeholder": "accesslog.log.path: the only placeholder is {node}",
    "accesslog_unknown_proxy": (
        "accesslog.proxies.sidecar-reviws-0: no proxy 'sidecar-reviws-0' "
        "(proxies: sidecar-reviews-0)"
    ),
    "unreadable": (
        "(top level): invalid YAML at line 4, column 4: "
        "expected <block end>, but found '<block mapping start>'"
    ),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_bad_fixture_gives_exact_message(name: str) -> None:
    path = BAD / f"{name}.yaml"
    with pytest.raises(ConfigError) as info:
        load_mesh(path)
    assert str(info.value) == f"{path}: {EXPECTED[name]}"
    assert isinstance(info.value, MeshConfigError)
    assert len(info.value.problems) == 1


def test_every_fixture_is_covered() -> None:
    assert {p.stem for p in BAD.glob("*.yaml")} == set(EXPECTED)


def test_missing_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_mesh(path)
    message = f"{path}: (top level): cannot read the file: No such file or directory"
    assert str(info.value) == message
    assert info.value.code == "unreadable_config"


def test_relative_path_is_kept_as_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(BAD.parent)
    with pytest.raises(ConfigError) as info:
        load_mesh("bad/unknown_service.yaml")
    assert str(info.value) == (
        "bad/unknown_service.yaml: routes[0].to.service: unknown service 'reviws'"
    )
