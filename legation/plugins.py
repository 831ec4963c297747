"""The plugin registry shared by every service.

A plugin kind (an ext_authz check, an ext_proc filter, a rate-limit backend...) is an entry-point
group. Each entry point names a :class:`PluginFactory`: ``validate(raw)`` turns the user's options
into a typed config (pure; raises :class:`~legation.errors.ConfigError` naming the field), and
``create(config)`` builds the plugin. Validation happens when the config is loaded, so a bad option
fails at start or reload, never on a request.

Built-ins are registered through the same entry points as third-party plugins (see pyproject.toml),
so there is one path to test. :func:`register` adds a factory at run time (tests, embedding).
"""

from __future__ import annotations

from collections.abc import Mapping
from importlib.metadata import entry_points
from typing import Any, Protocol, runtime_checkable

from legation.errors import ConfigError

GROUPS = {
    "extauthz.check": "legation.extauthz.checks",
    "extproc.filter": "legation.extproc.filters",
    "ratelimit.backend": "legation.ratelimit.backends",
}


@runtime_checkable
class PluginFactory(Protocol):
    """What an entry point must name."""

    name: str

    def validate(self, raw: Mapping[str, Any]) -> Any:
        """Check the raw options and return a typed, immutable config. Pure; raises ConfigError."""
        ...

    def create(self, config: Any) -> Any:
        """Build the plugin from a config that :meth:`validate` returned."""
        ...


_registered: dict[str, dict[str, PluginFactory]] = {}


def register(kind: str, factory: PluginFactory) -> None:
    """Add ``factory`` under ``kind`` (a key of :data:`GROUPS`) for this process."""
    _group(kind)
    _registered.setdefault(kind, {})[factory.name] = factory


def unregister(kind: str, name: str) -> None:
    _registered.get(kind, {}).pop(name, None)


def available(kind: str) -> dict[str, PluginFactory]:
    """Every factory of ``kind``: entry points first, run-time registrations override them."""
    found: dict[str, PluginFactory] = {}
    for ep in entry_points(group=_group(kind)):
        factory = ep.load()
        if isinstance(factory, type):
            factory = factory()
        found[ep.name] = factory
    found.update(_registered.get(kind, {}))
    return found


def get(kind: str, name: str, *, where: str = "") -> PluginFactory:
    """The factory called ``name``; the error says ``where`` it was asked and what is available."""
    plugins = available(kind)
    try:
        return plugins[name]
    except KeyError:
        prefix = f"{where}: " if where else ""
        known = ", ".join(sorted(plugins)) or "none"
        raise ConfigError(
            f"{prefix}unknown {kind} plugin {name!r} (available: {known})", code="unknown_plugin"
        ) from None


def _group(kind: str) -> str:
    try:
        return GROUPS[kind]
    except KeyError:
        raise ValueError(f"unknown plugin kind {kind!r}; one of {sorted(GROUPS)}") from None
