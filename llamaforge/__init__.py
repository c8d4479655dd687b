"""llamaforge: Llama 3 assembled from a declarative spec out of plugin components.

The public API is what this module exports; everything else is internal and may change.
"""

from __future__ import annotations

from typing import Any

from llamaforge.core.interfaces import (
    Activation,
    Adapter,
    Attention,
    AttentionKernel,
    AttentionMask,
    Exporter,
    Head,
    Importer,
    KVCache,
    Norm,
    PositionEmbedding,
    Quantizer,
    Sampler,
)
from llamaforge.core.loading import load_model, save_model
from llamaforge.core.model import LlamaForgeModel, ModelOutput, build_model
from llamaforge.core.spec import ComponentSpec, LayerOverride, ModelSpec, load_spec, preset_names
from llamaforge.errors import (
    DuplicateComponentError,
    LlamaforgeError,
    ModelFileError,
    PluginError,
    SpecError,
    UnknownComponentError,
)
from llamaforge.registry import hookimpl, registries

__version__ = "0.1.0"


def register(kind: str, name: str, factory: Any = None, **metadata: Any) -> Any:
    """Register a component at run time (notebooks, quick ablations); usable as a decorator.

    Packages should prefer the `llamaforge_register` hook with an entry point, so their components are
    discoverable by `llamaforge plugins` and by anyone who installs them.
    """

    def deco(f: Any) -> Any:
        registries().kind(kind).register(name, f, **metadata)
        return f

    return deco(factory) if factory is not None else deco


__all__ = [
    "Activation",
    "Adapter",
    "Attention",
    "AttentionKernel",
    "AttentionMask",
    "ComponentSpec",
    "DuplicateComponentError",
    "Exporter",
    "Head",
    "Importer",
    "KVCache",
    "LayerOverride",
    "LlamaForgeModel",
    "LlamaforgeError",
    "ModelFileError",
    "ModelOutput",
    "ModelSpec",
    "Norm",
    "PluginError",
    "PositionEmbedding",
    "Quantizer",
    "Sampler",
    "SpecError",
    "UnknownComponentError",
    "build_model",
    "hookimpl",
    "load_model",
    "load_spec",
    "preset_names",
    "register",
    "registries",
    "save_model",
]
