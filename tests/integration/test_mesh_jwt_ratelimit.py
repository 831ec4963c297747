"""A rate limit keyed by a verified JWT claim, end to end: the ext_authz ``jwt`` check verifies
the token and hands the ``sub`` claim to Envoy as dynamic metadata; the route's ``jwt_claim``
descriptor action reads it; the rate-limit service counts per user. Real Envoy, real services."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from legation.demo import DemoApp
from tests.conftest import free_port
from tests.envoy_stack import MeshWorld
from tests.extauthz.conftest import Signer
from tests.integration.test_mesh_services import http

pytestmark = [pytest.mark.integration]

ISSUER = "https://issuer.test"

MESH = """\
xds: {{port: {xds}}}
gateway: {{name: gw, port: {gw}, admin_port: {gw_admin}}}
extauthz: {{port: {authz}, config: authz.yaml}}
ratelimit: {{port: {rl}, config: limits.yaml, domain: api, failure_mode: closed}}
services:
  - name: web
    port: 9080
    endpoints: [{{port: {app}}}]
routes:
  - name: api
    match: {{path: {{prefix: /api}}}}
    to: {{service: web}}
    authz: api
    rate_limits:
      - actions:
          - {{generic_key: {{value: api}}}}
          - {{jwt_claim: {{claim: sub, key: user}}}}
"""

LIMITS = """\
domain: api
descriptors:
  - key: generic_key
    value: api
    descriptors:
      - key: user
        rate_limit: {unit: minute, requests_per_unit: 2}
"""


@pytest.fixture(scope="module")
def signer() -> Signer:
    return Signer("k1")


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, signer: Signer) -> Iterator[int]:
    tmp: Path = tmp_path_factory.mktemp("jwt-ratelimit")
    app = DemoApp(name="web").start_in_thread()
    ports = {n: free_port() for n in ("xds", "gw", "gw_admin", "authz", "rl")}
    authz = {
        "checks": {
            "jwt": {
                "type": "jwt",
                "options": {
                    "providers": [
                        {
                            "name": "test",
                            "issuer": ISSUER,
                            "audiences": ["api"],
                            "jwks": {"keys": [signer.jwk]},
                            "claims_to_metadata": ["sub"],
                        }
                    ]
                },
            }
        },
        "default_checks": ["jwt"],
    }
    (tmp / "authz.yaml").write_text(json.dumps(authz))
    (tmp / "limits.yaml").write_text(LIMITS)
    (tmp / "mesh.yaml").write_text(MESH.format(**ports, app=app.port))
    world = MeshWorld(tmp, tmp / "mesh.yaml", status_port=free_port())
    try:
        world.start()
        assert list(world.envoys) == ["gateway-gw"]
        yield ports["gw"]
    finally:
        world.close()
        app.stop_thread()


def bearer(signer: Signer, sub: str) -> dict[str, str]:
    now = int(time.time())
    token = signer.token({"iss": ISSUER, "aud": "api", "sub": sub, "iat": now, "exp": now + 300})
    return {"authorization": f"Bearer {token}"}


def test_limit_counts_per_verified_subject(gateway: int, signer: Signer) -> None:
    alice, bob = bearer(signer, "alice"), bearer(signer, "bob")
    assert [http(gateway, "/api/x", alice)[0] for _ in range(3)] == [200, 200, 429]
    # another subject has its own budget, whatever headers it sends
    assert http(gateway, "/api/x", {**bob, "x-user": "alice"})[0] == 200
    status, headers, _ = http(gateway, "/api/x", alice)
    assert status == 429 and headers["x-ratelimit-remaining"] == "0"


def test_no_token_is_denied_before_any_counting(gateway: int) -> None:
    assert http(gateway, "/api/x")[0] == 401
