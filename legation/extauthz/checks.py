"""The extension point: a check looks at one request and allows or denies it.

Built-in checks (``jwt``, ``rego``, ``opa``) and checks written in Python all implement
:class:`Check` and are created by a :class:`~legation.plugins.PluginFactory` registered under the
entry-point group ``legation.extauthz.checks``. The servicer runs the route's checks in order; the
first denial stops the chain (unless the route's policy is in dry-run).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from legation.extauthz.request import RequestContext


@dataclass(frozen=True, kw_only=True)
class Decision:
    """What one check decided, in opa-envoy-plugin's vocabulary.

    ``headers`` go to the upstream when allowed and to the client when denied;
    ``response_headers_to_add`` go to the client on an allowed request's response.
    """

    allowed: bool
    http_status: int | None = None
    body: str = ""
    headers: Mapping[str, str] = field(default_factory=dict)
    response_headers_to_add: Mapping[str, str] = field(default_factory=dict)
    request_headers_to_remove: tuple[str, ...] = ()
    dynamic_metadata: Mapping[str, Any] = field(default_factory=dict)
    reason: str = ""


ALLOW = Decision(allowed=True)


@runtime_checkable
class Check(Protocol):
    """One step of a route's authorization chain."""

    name: str

    async def check(self, ctx: RequestContext) -> Decision:
        """Decide on ``ctx``. Raise :class:`~legation.extauthz.errors.AuthzError` to deny with
        a stable code; any other exception is treated as an internal error and denies too."""
        ...

    async def start(self) -> None:
        """Begin background work (file watching, key prefetch). Called once before serving."""
        ...

    async def close(self) -> None:
        """Release connections and stop background work."""
        ...


@runtime_checkable
class PolicyCatalog(Protocol):
    """Optional, for checks that select a policy by name (``rego``): the names they serve, so
    the ``policy`` metric label stays bounded (see :mod:`legation.extauthz.observe`)."""

    def policy_names(self) -> Collection[str]:
        """The policy names this check can decide right now (after its latest reload)."""
        ...


class PythonCheck:
    """Convenience base for checks written in Python: override :meth:`check`."""

    name = "python"

    async def check(self, ctx: RequestContext) -> Decision:  # pragma: no cover - abstract
        raise NotImplementedError

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None
