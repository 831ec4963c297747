"""One validation phase: what a mesh's services need and what routes ask of them is checked
before anything is created, with the mesh file and field in every message; the mesh-level
service settings reach the running services."""

from __future__ import annotations

from pathlib import Path

import pytest

from legation import cli
from legation.config import MeshConfigError, load_mesh
from legation.controlplane import ControlPlane
from legation.errors import ConfigError
from legation.services.planning import plan
from tests.conftest import free_port

POLICY = "package demo.authz\n\nimport rego.v1\n\ndefault allow := false\n"

MESH = """\
xds: {{port: {xds}}}
mtls: {{mode: strict, ca_dir: meshca}}
services: [{{name: web, port: 9080, endpoints: [{{port: {app}}}]}}]
extauthz: {{port: {authz}, config: authz.yaml}}
routes:
  - {{name: web, mesh_hosts: [web], to: {{service: web}}, authz: {policy}}}
"""


def write(tmp: Path, policy: str) -> Path:
    (tmp / "policies").mkdir(exist_ok=True)
    (tmp / "policies" / "authz.rego").write_text(POLICY)
    (tmp / "authz.yaml").write_text(
        "checks: {rego: {type: rego, options: {policy_dir: policies}}}\ndefault_checks: [rego]\n"
    )
    path = tmp / "mesh.yaml"
    path.write_text(MESH.format(xds=free_port(), app=free_port(), authz=free_port(), policy=policy))
    return path


def test_a_misspelt_policy_package_fails_legation_check(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, "demo.authzz")
    assert cli.main(["check", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.strip() == (
        f"{path}: routes[0].authz: no policy package 'demo.authzz' in "
        f"{(tmp_path / 'policies').resolve()} (it declares: demo.authz)"
    )
    assert not (tmp_path / "meshca").exists()


def test_an_existing_package_or_rule_path_passes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for policy in ("demo.authz", "demo/authz/allow", "disabled"):
        path = write(tmp_path, policy)
        assert cli.main(["check", str(path)]) == 0, capsys.readouterr().err
        assert "ok (" in capsys.readouterr().out


async def test_a_rejected_mesh_creates_no_ca(tmp_path: Path) -> None:
    path = write(tmp_path, "demo.nope")
    cp = ControlPlane(path, status_port=0, ca_dir=tmp_path / "xdsca", on_event=lambda _: None)
    with pytest.raises(MeshConfigError, match=r"routes\[0\]\.authz: no policy package"):
        await cp.start()
    assert not (tmp_path / "meshca").exists() and not (tmp_path / "xdsca").exists()


async def test_a_mesh_rejected_by_translation_creates_no_ca(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Certificates are issued once a mesh is accepted, not while it is being translated."""
    import legation._reloading as reloading

    def refuse(*args: object, **kwargs: object) -> None:
        raise ConfigError("translation refused")

    monkeypatch.setattr(reloading, "translate", refuse)  # the validation phase's translation
    path = write(tmp_path, "demo.authz")
    cp = ControlPlane(path, status_port=0, ca_dir=tmp_path / "xdsca", on_event=lambda _: None)
    with pytest.raises(ConfigError, match="translation refused"):
        await cp.start()
    assert not (tmp_path / "meshca").exists() and not (tmp_path / "xdsca").exists()


class _Counted:
    """The ``headers`` filter's factory, counting its calls."""

    name = "counted_headers"

    def __init__(self) -> None:
        from legation import plugins
        from legation.config.extensions import FILTER_KIND

        self.inner = plugins.get(FILTER_KIND, "headers")
        self.calls = {"validate": 0, "create": 0}

    def validate(self, raw: object) -> object:
        self.calls["validate"] += 1
        return self.inner.validate(raw)  # type: ignore[arg-type]

    def create(self, config: object) -> object:
        self.calls["create"] += 1
        return self.inner.create(config)


def test_filter_plugins_are_validated_and_built_once_per_load(tmp_path: Path) -> None:
    from legation import plugins
    from legation.config.extensions import FILTER_KIND
    from legation.services.chains import route_chains
    from legation.translate import translate

    factory = _Counted()
    plugins.register(FILTER_KIND, factory)  # type: ignore[arg-type]
    try:
        path = tmp_path / "mesh.yaml"
        path.write_text(
            "services: [{name: web, port: 9080, endpoints: [{port: 9101}]}]\n"
            "extproc: {port: 18011}\n"
            "routes:\n  - name: web\n    mesh_hosts: [web]\n    to: {service: web}\n"
            "    filters: [{name: counted_headers, options: {request: {set: {x-a: b}}}}]\n"
        )
        mesh = load_mesh(path)
        specs = plan(mesh, mesh_path=path)
        translate(mesh, version="v1")
        assert specs.embedded["extproc"].live["chains"] is route_chains(mesh)
        assert factory.calls == {"validate": 1, "create": 1}
    finally:
        plugins.unregister(FILTER_KIND, "counted_headers")


async def test_mesh_level_settings_reach_the_services(tmp_path: Path) -> None:
    (tmp_path / "limits.yaml").write_text("domain: mesh\ndescriptors: []\n")
    path = tmp_path / "mesh.yaml"
    path.write_text(
        f"xds: {{port: {free_port()}}}\n"
        "services: [{name: web, port: 9080, endpoints: [{port: 9101}]}]\n"
        f"extproc: {{port: {free_port()}, stream_idle_timeout: 42s, timeout: 300ms}}\n"
        f"ratelimit: {{port: {free_port()}, config: limits.yaml, quota_mode: true,\n"
        "            response_headers: true, response_header_names: {limit: X-Limit},\n"
        "            response_dynamic_metadata: true, max_keys: 1000, max_bytes: 131072}\n"
    )
    cp = ControlPlane(path, status_port=0, ca_dir=tmp_path / "ca", on_event=lambda _: None)
    await cp.start()
    try:
        proc = cp.services.running["extproc"].servicer  # type: ignore[attr-defined]
        assert proc._idle == 42.0
        server = cp.services.running["ratelimit"].server  # type: ignore[attr-defined]
        limiter = server.legation_limiter
        assert limiter.quota_mode and limiter.dynamic_metadata
        assert limiter.response_headers.limit == "X-Limit"
        assert limiter.response_headers.remaining == "RateLimit-Remaining"
        assert (limiter.backend._config.max_keys, limiter.backend._config.max_bytes) == (
            1000,
            131072,
        )
        # a mode changed in the mesh is swapped into the running limiter, no restart
        path.write_text(path.read_text().replace("quota_mode: true", "quota_mode: false"))
        assert await cp.reload() is True
        assert cp.services.running["ratelimit"].server is server  # type: ignore[attr-defined]
        assert limiter.quota_mode is False
    finally:
        await cp.stop()
