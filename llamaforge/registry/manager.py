"""Loading plugins into the registries.

Built-ins and third-party plugins go through the same pluggy hook. External plugins are discovered from the
entry-point group ``llamaforge``; ``LLAMAFORGE_PLUGINS`` (comma-separated entry-point or distribution names, empty
for none) restricts which load. A plugin that fails to import or register is reported with its distribution and
cause and skipped, so built-ins keep working.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import os
import threading
import warnings
from dataclasses import dataclass
from typing import Any

import pluggy

from llamaforge.core.interfaces import KINDS
from llamaforge.errors import PluginError
from llamaforge.registry import hookspecs
from llamaforge.registry.registry import Registries, Source

ENTRY_POINT_GROUP = "llamaforge"
ALLOWLIST_ENV = "LLAMAFORGE_PLUGINS"


def builtin_modules() -> list[str]:
    """Every module in llamaforge.plugins that implements the hook (sorted, so registration order is stable)."""
    import pkgutil

    import llamaforge.plugins as pkg

    return [f"{pkg.__name__}.{m.name}" for m in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name)]


class PluginLoadWarning(UserWarning):
    """A third-party plugin could not be loaded; the built-ins are unaffected."""


@dataclass(frozen=True)
class PluginFailure:
    plugin: str
    distribution: str
    version: str
    cause: str

    def message(self) -> str:
        return (
            f"llamaforge plugin {self.plugin!r} from distribution {self.distribution} {self.version} "
            f"failed to load: {self.cause}"
        )


class PluginState:
    """The plugin manager, the registries it filled and what failed."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.registries = Registries(KINDS)
        self.failures: list[PluginFailure] = []
        self.sources: dict[str, Source] = {}

    def _register_callback(self, source: Source):
        def register(kind: str, name: str, factory: Any, **metadata: Any) -> None:
            self.registries.kind(kind).register(name, factory, source=source, **metadata)

        return register

    def add_plugin(self, plugin: Any, source: Source) -> None:
        """Register `plugin` with pluggy and run its hook; on failure roll back its partial registrations."""
        snap = self.registries.snapshot()
        self.pm.register(plugin, name=source.plugin)
        try:
            others = [p for p in self.pm.get_plugins() if p is not plugin]
            caller = self.pm.subset_hook_caller("llamaforge_register", remove_plugins=others)
            caller(register=self._register_callback(source))
        except Exception:
            self.registries.restore(snap)
            self.pm.unregister(plugin)
            raise
        self.sources[source.plugin] = source


def _allowlist() -> set[str] | None:
    raw = os.environ.get(ALLOWLIST_ENV)
    if raw is None:
        return None
    return {p.strip() for p in raw.split(",") if p.strip()}


def _load(state: PluginState) -> None:
    version = _own_version()
    for mod_name in builtin_modules():
        module = importlib.import_module(mod_name)
        if not hasattr(module, "llamaforge_register"):
            continue
        state.add_plugin(module, Source(plugin=mod_name, distribution="llamaforge", version=version))

    allow = _allowlist()
    for ep in md.entry_points(group=ENTRY_POINT_GROUP):
        dist = ep.dist.name if ep.dist is not None else "unknown"
        dist_version = ep.dist.version if ep.dist is not None else ""
        if allow is not None and ep.name not in allow and dist not in allow:
            continue
        try:
            plugin = ep.load()
            state.add_plugin(plugin, Source(plugin=ep.name, distribution=dist, version=dist_version))
        except Exception as exc:  # a broken third-party plugin must not take the built-ins down
            failure = PluginFailure(ep.name, dist, dist_version, f"{type(exc).__name__}: {exc}")
            state.failures.append(failure)
            warnings.warn(failure.message(), PluginLoadWarning, stacklevel=3)


def _own_version() -> str:
    try:
        return md.version("llamaforge")
    except md.PackageNotFoundError:
        return "0+unknown"


_STATE: PluginState | None = None
_LOCK = threading.RLock()


def plugin_state(reload: bool = False) -> PluginState:
    """The process-wide plugin state, loaded on first use."""
    global _STATE
    with _LOCK:
        if _STATE is None or reload:
            state = PluginState()
            _STATE = state
            try:
                _load(state)
            except Exception:
                _STATE = None
                raise
        return _STATE


def registries() -> Registries:
    return plugin_state().registries


def plugin_failures() -> list[PluginFailure]:
    return list(plugin_state().failures)


def check_plugins() -> None:
    """Raise PluginError if any external plugin failed (for strict front ends and CI)."""
    failures = plugin_failures()
    if failures:
        raise PluginError("; ".join(f.message() for f in failures))


def lookup(kind: str, name: str):
    """The registry entry for `name`, with failed plugins mentioned in the error when it is missing."""
    from llamaforge.errors import UnknownComponentError

    try:
        return registries().kind(kind).entry(name)
    except UnknownComponentError as exc:
        failures = plugin_failures()
        if failures:
            notes = "; ".join(f.message() for f in failures)
            raise UnknownComponentError(f"{exc} (Note: {notes})") from None
        raise
