"""The mesh's ``mtls`` block: defaults, durations, and every check naming the field."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from legation.config import MeshConfigError
from tests.config.meshdata import base, parse


def with_mtls(**mtls: Any) -> dict[str, Any]:
    data = base()
    data["mtls"] = mtls
    return data


def error_of(data: dict[str, Any]) -> list[str]:
    with pytest.raises(MeshConfigError) as info:
        parse(data)
    return str(info.value).splitlines()


def test_off_by_default() -> None:
    mesh = parse(base())
    assert mesh.mtls.mode == "off" and not mesh.mtls.enabled
    assert mesh.mtls.cert_ttl == timedelta(hours=24)
    assert (mesh.mtls.trust_domain, mesh.mtls.namespace) == ("cluster.local", "default")


def test_unquoted_yaml_off_means_off() -> None:
    assert parse(with_mtls(mode=False)).mtls.mode == "off"
    assert error_of(with_mtls(mode="sometimes")) == [
        "mesh.yaml: mtls.mode: expected 'off', 'permissive' or 'strict', got 'sometimes'"
    ]


def test_a_full_block() -> None:
    mesh = parse(
        with_mtls(
            mode="strict",
            trust_domain="example.org",
            namespace="shop",
            cert_ttl="90m",
            ca_dir="state/ca",
        )
    )
    m = mesh.mtls
    assert (m.enabled, m.trust_domain, m.namespace, m.cert_ttl, m.ca_dir) == (
        True,
        "example.org",
        "shop",
        timedelta(minutes=90),
        "state/ca",
    )


@pytest.mark.parametrize(
    ("mtls", "message"),
    [
        (
            {"mode": "strict", "mtls_mode": "x"},
            "mtls.mtls_mode: unknown key (allowed: ca_cert, ca_dir, ca_key, cert_ttl, mode, "
            "namespace, trust_domain)",
        ),
        (
            {"trust_domain": "Cluster.Local"},
            "mtls.trust_domain: expected a trust domain (lower-case letters, digits, '.', '-', "
            "'_'), got 'Cluster.Local'",
        ),
        (
            {"namespace": "My_NS"},
            "mtls.namespace: expected a lower-case name (letters, digits and '-', not at either "
            "end), got 'My_NS'",
        ),
        ({"cert_ttl": "5s"}, "mtls.cert_ttl: must be between 10s and 365 days"),
        ({"cert_ttl": "soon"}, "mtls.cert_ttl: invalid duration 'soon': use e.g. 250ms, 2s or 1m"),
        ({"ca_cert": "ca.crt"}, "mtls.ca_cert: needs mtls.ca_key too"),
        (
            {"ca_dir": "ca", "ca_cert": "ca.crt", "ca_key": "ca.key"},
            "mtls.ca_dir: give either ca_dir or ca_cert and ca_key, not both",
        ),
    ],
)
def test_bad_blocks_name_the_field(mtls: dict[str, Any], message: str) -> None:
    assert error_of(with_mtls(**mtls)) == [f"mesh.yaml: {message}"]


def test_service_named_like_the_gateway_only_matters_with_mtls() -> None:
    data = base()
    data["services"][1]["name"] = "ingress"
    data["routes"][0]["to"]["service"] = "ingress"
    assert parse(data).mtls.mode == "off"
    data["mtls"] = {"mode": "permissive"}
    assert error_of(data) == [
        "mesh.yaml: gateway.name: a service is also named 'ingress': with mTLS they would share "
        "a SPIFFE identity"
    ]
