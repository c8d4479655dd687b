"""User-facing exceptions.

Every error a user can cause (a bad spec, a bad file, an unknown component, a broken plugin) is one of these, so
front ends (CLI, HTTP) can print a one-line cause and the fix instead of a traceback from deep inside torch.
"""

from __future__ import annotations


class LlamaforgeError(Exception):
    """Base class: the message is the cause and, where there is one, the fix."""


class SpecError(LlamaforgeError, ValueError):
    """A model/training spec is invalid; the message names the field and the fix."""


class UnknownComponentError(LlamaforgeError, KeyError):
    """A name is not registered under an interface kind."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class DuplicateComponentError(LlamaforgeError, ValueError):
    """Two sources registered the same name under one interface kind."""


class PluginError(LlamaforgeError, RuntimeError):
    """A third-party plugin failed to import or to register its components."""


class ModelFileError(LlamaforgeError, ValueError):
    """A model directory or checkpoint file is missing, unreadable or inconsistent."""


class DataError(LlamaforgeError, ValueError):
    """A data source is missing, unreadable, of an unknown format, or yields nothing usable."""
