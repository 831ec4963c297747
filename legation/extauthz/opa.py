"""The ``opa`` check: a remote OPA server over its REST data API, via ``opa-python-client``.

``POST /v1/data/<package>/<rule>`` with ``{"input": <the same document the rego check sees>}``;
the ``result`` is read like the embedded engine's. One aiohttp session (connections reused) per
check, a request timeout, and any failure denies (fail closed) with the ``opa_unavailable`` code.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import aiohttp
from opa_client.opa_async import AsyncOpaClient
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from legation.errors import ConfigError
from legation.extauthz.checks import Decision
from legation.extauthz.config import pydantic_error
from legation.extauthz.errors import AuthzError
from legation.extauthz.rego import entrypoint
from legation.extauthz.request import RequestContext
from legation.extauthz.response import decision_from_result


class OpaConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str = "http://127.0.0.1:8181"
    decision: str = Field(default="allow", pattern=r"^[A-Za-z_]\w*$")
    default_policy: str | None = None
    timeout_s: float = Field(default=1.0, gt=0, le=30)
    retries: int = Field(default=0, ge=0, le=3)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be http(s)://host[:port]")
        return value


class OpaCheck:
    name = "opa"

    def __init__(self, config: OpaConfig) -> None:
        self.config = config
        url = urlsplit(config.url)
        self.client = AsyncOpaClient(
            host=url.hostname or "127.0.0.1",
            port=url.port or (443 if url.scheme == "https" else 80),
            ssl=url.scheme == "https",
            timeout=config.timeout_s,
            retries=config.retries,
        )
        self._started = False

    async def check(self, ctx: RequestContext) -> Decision:
        policy = ctx.extensions.get("policy") or self.config.default_policy
        if not policy:
            raise AuthzError(
                "opa: the route names no policy and no default_policy is set", code="no_policy"
            )
        document = ctx.input()
        if not self._started:
            await self.start()
        path = entrypoint(policy, self.config.decision)
        try:
            reply = await self.client.query_rule(document, path)
        except (TimeoutError, aiohttp.ClientError, ValueError) as e:
            raise AuthzError(f"opa: {policy}: {type(e).__name__}", code="opa_unavailable") from None
        if not isinstance(reply, dict):
            raise AuthzError(f"opa: {policy}: the reply is not an object", code="opa_unavailable")
        return decision_from_result(reply.get("result"), where=f"opa policy {policy}")

    async def start(self) -> None:
        if not self._started:
            await self.client._init_session()  # the client's own session setup, on our loop
            self._started = True

    async def close(self) -> None:
        await self.client.close_connection()
        self._started = False


class OpaCheckFactory:
    name = "opa"

    def validate(self, raw: Any) -> OpaConfig:
        try:
            return OpaConfig.model_validate(raw)
        except ValidationError as e:
            raise ConfigError(pydantic_error(e)) from None

    def create(self, config: OpaConfig) -> OpaCheck:
        return OpaCheck(config)
