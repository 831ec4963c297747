"""The extension point: a check looks at one request and allows or denies it.

Built-in checks (``jwt``, ``rego``, ``opa``) and checks written in Python all implement
:class:`Check` and are created by a :class:`~legation.plugins.PluginFactory` registered under the
entry-point group ``legation.extauthz.checks``. The servicer runs the route's checks in order; the
first denial stops the chain (unless the route's policy is in dry-run).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from legation.extauthz.request import RequestContext

# Headers as a name -> value mapping, or as (name, value) pairs when a name has several values
# (two Set-Cookie): opa-envoy-plugin sends one header entry per value, never a joined value.
Headers = Mapping[str, str] | Sequence[tuple[str, str]]


def header_items(headers: Headers) -> Iterable[tuple[str, str]]:
    """The (name, value) pairs of ``headers``, in order."""
    return headers.items() if isinstance(headers, Mapping) else headers


@dataclass(frozen=True, kw_only=True)
class Decision:
    """What one check decided, in opa-envoy-plugin's vocabulary.

    ``headers`` go to the upstream when allowed and to the client when denied;
    ``response_headers_to_add`` go to the client on an allowed request's response;
    ``request_headers_to_remove``, ``query_parameters_to_set`` ((key, value) pairs, a key may
    repeat) and ``query_parameters_to_remove`` change the allowed request before it goes
    upstream (query parameters: gRPC ext_authz only); ``http_status`` and ``body`` make the
    denial. ``dynamic_metadata`` is emitted by Envoy for the filters and access logs after it.
    """

    allowed: bool
    http_status: int | None = None
    body: str = ""
    headers: Headers = field(default_factory=dict)
    response_headers_to_add: Headers = field(default_factory=dict)
    request_headers_to_remove: tuple[str, ...] = ()
    query_parameters_to_set: tuple[tuple[str, str], ...] = ()
    query_parameters_to_remove: tuple[str, ...] = ()
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
