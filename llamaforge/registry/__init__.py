"""Where to find components: the per-kind registries and the plugin manager that fills them."""

from llamaforge.registry.hookspecs import hookimpl
from llamaforge.registry.manager import (
    PluginFailure,
    PluginLoadWarning,
    check_plugins,
    lookup,
    plugin_failures,
    plugin_state,
    registries,
)
from llamaforge.registry.registry import Entry, Registry, Source

__all__ = [
    "Entry",
    "PluginFailure",
    "PluginLoadWarning",
    "Registry",
    "Source",
    "check_plugins",
    "hookimpl",
    "lookup",
    "plugin_failures",
    "plugin_state",
    "registries",
]
