"""The hook every plugin implements, built-in or third-party.

A plugin module (or object) defines::

    from llamaforge.registry import hookimpl

    @hookimpl
    def llamaforge_register(register):
        register("norm", "relu2_norm", MyNorm)

and declares itself in its pyproject.toml::

    [project.entry-points.llamaforge]
    my_plugin = "my_package.plugin"
"""

from __future__ import annotations

from typing import Protocol

import pluggy

PROJECT = "llamaforge"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


class RegisterCallback(Protocol):
    def __call__(self, kind: str, name: str, factory: object, **metadata: object) -> None: ...


@hookspec
def llamaforge_register(register: RegisterCallback) -> None:
    """Register components by calling `register(kind, name, factory, doc=..., params_model=...)`.

    `kind` is one of `llamaforge.core.interfaces.KINDS`; `params_model` is an optional pydantic model that
    validates the spec's `params` for this component.
    """
