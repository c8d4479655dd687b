"""The `lora` adapter: low-rank updates W + scale * B @ A wrapped around built modules, selected by name.

A wrapped module keeps its own class behaviour and parameters: its class is swapped for a subclass that adds the
low-rank path to whatever `forward(x)` the module had (a plain Linear, the output head, an nf4-quantized linear),
so `...q_proj.weight` (or a quantized module's packed buffers) keep their state-dict names and the adapter
parameters sit beside them under `...q_proj.lora_A.<adapter>.weight` / `lora_B`. Removing the last adapter swaps
the class back and deletes the adapter attributes: the module is exactly what it was.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from llamaforge.core.finetune import AdapterError, AdapterFactor, linear_features
from llamaforge.core.interfaces import Adapter, AdapterLayer
from llamaforge.registry import hookimpl

# Shorthands accepted in `targets` besides module names and glob patterns.
TARGET_GROUPS: dict[str, tuple[str, ...]] = {
    "attention": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mlp": ("gate_proj", "up_proj", "down_proj"),
    "all-linear": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
}


def _module_device(module: nn.Module) -> torch.device:
    for t in (*module.parameters(), *module.buffers()):
        return t.device
    return torch.device("cpu")


class LoRALayer(AdapterLayer):
    """Mixed in front of a wrapped module's own class (see `wrap`); holds any number of named LoRA adapters."""

    lora_A: nn.ModuleDict
    lora_B: nn.ModuleDict

    def _lora_init(self, base_class: type) -> None:
        self._lora_base_class = base_class
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_scaling: dict[str, float] = {}
        self.lora_dropout: dict[str, float] = {}
        self.lora_config: dict[str, dict[str, Any]] = {}
        self._lora_active: list[str] = []
        self._lora_merged: list[str] = []
        self._lora_original: torch.Tensor | None = None
        self.adapters_enabled = True

    # ----- forward --------------------------------------------------------------------------------------------
    def _lora_pending(self) -> list[str]:
        """Active adapters whose update is not already inside the base weight."""
        if not self.adapters_enabled:
            return []
        return [n for n in self._lora_active if n in self.lora_A and n not in self._lora_merged]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = super().forward(x, *args, **kwargs)
        for name in self._lora_pending():
            a = self.lora_A[name].weight
            b = self.lora_B[name].weight
            h = x if torch.is_autocast_enabled(x.device.type) else x.to(a.dtype)
            p = self.lora_dropout[name]
            if p and self.training:
                h = F.dropout(h, p, True)
            update = F.linear(F.linear(h, a), b) * self.lora_scaling[name]
            result = result + update.to(result.dtype)
        return result

    def projection(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """A head with pending adapters is no longer a plain projection: the loss must run through forward."""
        if self._lora_pending():
            return None
        base = getattr(super(), "projection", None)
        return base() if callable(base) else None

    # ----- AdapterLayer ---------------------------------------------------------------------------------------
    def adapter_names(self) -> list[str]:
        return list(self.lora_A.keys())

    def set_active_adapters(self, names: list[str]) -> None:
        """Merged adapters stay in the weight whatever is active (the model-level switch refuses that case)."""
        self._lora_active = [n for n in names if n in self.lora_A]

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        self._require(name)
        return [self.lora_A[name].weight, self.lora_B[name].weight]

    def adapter_state_dict(self, name: str) -> dict[str, torch.Tensor]:
        self._require(name)
        return {"lora_A.weight": self.lora_A[name].weight.detach(), "lora_B.weight": self.lora_B[name].weight.detach()}

    def load_adapter_state_dict(self, name: str, state: dict[str, torch.Tensor]) -> None:
        self._require(name)
        expected = {"lora_A.weight": self.lora_A[name].weight, "lora_B.weight": self.lora_B[name].weight}
        if set(state) != set(expected):
            raise AdapterError(f"adapter {name!r}: expected tensors {sorted(expected)}, got {sorted(state)}")
        for key, param in expected.items():
            if tuple(state[key].shape) != tuple(param.shape):
                raise AdapterError(
                    f"adapter {name!r}: {key} has shape {tuple(state[key].shape)}, this layer needs "
                    f"{tuple(param.shape)} (a different rank or base model?)"
                )
        if name in self._lora_merged:
            raise AdapterError(f"adapter {name!r} is merged; unmerge it before loading new weights into it")
        with torch.no_grad():
            for key, param in expected.items():
                param.copy_(state[key])

    def delta_weight(self, name: str) -> torch.Tensor:
        """scale * B @ A shaped like the base weight (out, in), in fp32 or the factors' dtype where that is wider:
        a bf16 update rounded before it meets the weight would lose what merging is meant to keep."""
        self._require(name)
        a = self.lora_A[name].weight.detach()
        b = self.lora_B[name].weight.detach()
        dtype = torch.promote_types(a.dtype, torch.float32)
        return (b.to(dtype) @ a.to(dtype)) * self.lora_scaling[name]

    def _mergeable_weight(self) -> nn.Parameter:
        weight = getattr(self, "weight", None)
        if not isinstance(weight, torch.Tensor) or not weight.is_floating_point() or weight.dim() != 2:
            raise AdapterError(
                f"cannot merge into a {self._lora_base_class.__name__}: it has no floating-point weight matrix "
                f"(quantized base?). Keep the adapter unmerged, or load the base unquantized and merge there"
            )
        return weight

    def merge(self, names: list[str] | None = None, *, keep_original: bool = True) -> None:
        names = [n for n in (names if names is not None else self._lora_active) if n not in self._lora_merged]
        if names:
            weight = self._mergeable_weight()
            with torch.no_grad():
                if keep_original and not self._lora_merged:
                    self._lora_original = weight.detach().clone()
                # summed in fp32 at least, and in the weight's own dtype where it is wider (a float64 base)
                total = weight.detach().to(torch.promote_types(weight.dtype, torch.float32))
                for name in names:
                    total = total + self.delta_weight(name).to(total.device, total.dtype)
                weight.copy_(total.to(weight.dtype))
            self._lora_merged.extend(names)
        if not keep_original:  # merged for good: the weight is now the base
            self._lora_original = None

    def unmerge(self) -> None:
        if not self._lora_merged:
            return
        if self._lora_original is None:
            raise AdapterError("these adapters were merged for good (keep_original=False); reload the base model")
        with torch.no_grad():
            self._mergeable_weight().copy_(self._lora_original)
        self._lora_original = None
        self._lora_merged = []

    def remove(self, name: str) -> None:
        self._require(name)
        merged = list(self._lora_merged)
        if name in merged:
            if self._lora_original is None:  # merged for good: the base already contains it
                self._lora_merged.remove(name)
            else:
                self.unmerge()
                merged.remove(name)
        for table in (self.lora_A, self.lora_B):
            del table[name]
        for table in (self.lora_scaling, self.lora_dropout, self.lora_config):
            table.pop(name, None)
        self._lora_active = [n for n in self._lora_active if n != name]
        if self.adapter_names():
            if merged and self._lora_original is None:
                self.merge([n for n in merged if n in self.lora_A])
            return
        self._unwrap()

    def _unwrap(self) -> None:
        base_class = self._lora_base_class
        del self.lora_A
        del self.lora_B
        for attr in (
            "lora_scaling",
            "lora_dropout",
            "lora_config",
            "_lora_active",
            "_lora_merged",
            "_lora_original",
            "_lora_base_class",
            "adapters_enabled",
        ):
            self.__dict__.pop(attr, None)
        self.__class__ = base_class

    def _require(self, name: str) -> None:
        if name not in self.lora_A:
            raise AdapterError(f"no adapter {name!r} on this layer (it has {self.adapter_names()})")

    # ----- LoRA specifics -------------------------------------------------------------------------------------
    def add_lora(
        self,
        name: str,
        *,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        rslora: bool = False,
        dtype: torch.dtype = torch.float32,
        generator: torch.Generator | None = None,
    ) -> None:
        if name in self.lora_A:
            raise AdapterError(f"this layer already has an adapter named {name!r}; pick another name or remove it")
        features = linear_features(self)
        assert features is not None
        fin, fout = features
        device = _module_device(self)
        weight = getattr(self, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.is_floating_point() and weight.element_size() > 4:
            # a float64 base (numerics checks, research) gets float64 factors: fp32 ones would round every update
            # below the precision the base was given; narrower bases keep the requested dtype (fp32 by default)
            dtype = torch.promote_types(dtype, weight.dtype)
        a = AdapterFactor(rank, fin, device, dtype)
        b = AdapterFactor(fout, rank, device, dtype)
        with torch.no_grad():
            # A like nn.Linear's default init (what PEFT uses), B zero: the adapter starts as the identity update
            bound = 1.0 / math.sqrt(fin)
            if generator is None:
                a.weight.uniform_(-bound, bound)
            else:
                a.weight.copy_(torch.rand(a.weight.shape, generator=generator) * 2 * bound - bound)
            b.weight.zero_()
        self.lora_A[name] = a
        self.lora_B[name] = b
        self.lora_scaling[name] = alpha / math.sqrt(rank) if rslora else alpha / rank
        self.lora_dropout[name] = float(dropout)
        self.lora_config[name] = {"rank": rank, "alpha": alpha, "dropout": dropout, "rslora": rslora}

    # ----- persistence of merged layers -----------------------------------------------------------------------
    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        """A merged layer saves its original base weight, so a saved model reloads as base + unmerged adapter
        (the same outputs) instead of applying the update twice."""
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._lora_original is not None and prefix + "weight" in destination:
            destination[prefix + "weight"] = self._lora_original

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        if self._lora_merged:  # loaded weights are unmerged base weights
            self._lora_merged, self._lora_original = [], None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        base = super().extra_repr()
        parts = [f"{n}: r={c['rank']}, alpha={c['alpha']}" for n, c in self.lora_config.items()]
        return f"{base}, lora=[{'; '.join(parts)}]" if base else f"lora=[{'; '.join(parts)}]"


_WRAPPED: dict[type, type] = {}


def wrap(module: nn.Module) -> LoRALayer:
    """Turn `module` into a LoRALayer in place (idempotent); its parameters and buffers are untouched."""
    if isinstance(module, LoRALayer):
        return module
    if linear_features(module) is None:
        raise AdapterError(
            f"cannot put LoRA on a {type(module).__name__}: it is not a linear layer (needs in_features/out_features "
            f"or a 2-D weight)"
        )
    base_class = type(module)
    cls = _WRAPPED.get(base_class)
    if cls is None:
        cls = type(f"LoRA{base_class.__name__}", (LoRALayer, base_class), {"__module__": __name__})
        _WRAPPED[base_class] = cls
    module.__class__ = cls
    module._lora_init(base_class)  # type: ignore[attr-defined]
    return module  # type: ignore[return-value]


# ----- target selection -----------------------------------------------------------------------------------------
def normalise_targets(targets: str | Iterable[str]) -> list[str]:
    """`"q_proj,v_proj"`, a list, or group names (attention, mlp, all-linear) -> a flat, de-duplicated list."""
    items = [t.strip() for t in targets.split(",")] if isinstance(targets, str) else [str(t).strip() for t in targets]
    out: list[str] = []
    for item in items:
        if not item:
            continue
        for t in TARGET_GROUPS.get(item, (item,)):
            if t not in out:
                out.append(t)
    if not out:
        raise AdapterError("no LoRA targets given; name modules such as q_proj,v_proj (or attention, mlp, lm_head)")
    return out


def _matches(pattern: str, name: str) -> bool:
    if any(c in pattern for c in "*?["):
        return fnmatch.fnmatchcase(name, pattern)
    return name == pattern or name.endswith("." + pattern)


def match_targets(model: nn.Module, targets: str | Iterable[str]) -> list[str]:
    """Names of the modules selected by `targets`: a bare name matches that module name or any name ending in
    `.name` (PEFT's rule); a pattern with * ? [ is matched against the full name. Every target must select at
    least one linear layer, so a typo fails here instead of training nothing."""
    patterns = normalise_targets(targets)
    names = [n for n, _ in model.named_modules() if n]
    inside_adapters = (".lora_A", ".lora_B")
    candidates = [n for n in names if not any(part in n for part in inside_adapters)]
    chosen: list[str] = []
    for pattern in patterns:
        hits = [n for n in candidates if _matches(pattern, n)]
        linear_hits = [n for n in hits if linear_features(model.get_submodule(n)) is not None]
        if not linear_hits:
            shorts = sorted(
                {n.rsplit(".", 1)[-1] for n in candidates if linear_features(model.get_submodule(n)) is not None}
            )
            if hits:
                raise AdapterError(
                    f"LoRA target {pattern!r} selects {hits[:3]}, which are not linear layers; "
                    f"linear layers here: {', '.join(shorts)}"
                )
            raise AdapterError(
                f"LoRA target {pattern!r} matches no module of this model; linear layers here: {', '.join(shorts)}"
            )
        chosen.extend(n for n in linear_hits if n not in chosen)
    return chosen


class LoRA(Adapter):
    """Low-rank adaptation: each targeted linear map W gets W + scale * B @ A with A (rank x in), B (out x rank),
    B zero at the start. scale = alpha / rank, or alpha / sqrt(rank) with rsLoRA (stable for large ranks)."""

    def __init__(
        self,
        rank: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
        targets: str | list[str] = ("q_proj", "v_proj"),  # type: ignore[assignment]
        rslora: bool = False,
        adapter_name: str = "default",
        dtype: str = "float32",
        seed: int | None = None,
    ) -> None:
        if int(rank) != rank or rank < 1:
            raise AdapterError(f"LoRA rank must be a positive integer, got {rank!r}")
        if alpha <= 0:
            raise AdapterError(f"LoRA alpha must be positive, got {alpha!r}")
        if not 0.0 <= dropout < 1.0:
            raise AdapterError(f"LoRA dropout must be in [0, 1), got {dropout!r}")
        if not adapter_name or "." in adapter_name:
            raise AdapterError(f"adapter name {adapter_name!r} must be non-empty and contain no '.'")
        from llamaforge.core.model import torch_dtype

        self.rank, self.alpha, self.dropout = int(rank), float(alpha), float(dropout)
        self.targets = normalise_targets(targets)
        self.rslora = bool(rslora)
        self.name = adapter_name
        self.dtype = torch_dtype(dtype)
        self.seed = seed

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.rank) if self.rslora else self.alpha / self.rank

    def config(self) -> dict[str, Any]:
        """The factory parameters that rebuild this adapter (what adapter files and transforms.json record)."""
        return {
            "rank": self.rank,
            "alpha": self.alpha,
            "dropout": self.dropout,
            "targets": list(self.targets),
            "rslora": self.rslora,
        }

    def add(self, model: nn.Module, name: str | None = None) -> nn.Module:
        name = name or self.name
        modules = match_targets(model, self.targets)
        for module_name in modules:
            existing = model.get_submodule(module_name)
            if isinstance(existing, LoRALayer) and name in existing.adapter_names():
                raise AdapterError(f"the model already has an adapter named {name!r}; remove it or pick another name")
        generator = torch.Generator().manual_seed(self.seed) if self.seed is not None else None
        for module_name in modules:
            layer = wrap(model.get_submodule(module_name))
            layer.add_lora(
                name,
                rank=self.rank,
                alpha=self.alpha,
                dropout=self.dropout,
                rslora=self.rslora,
                dtype=self.dtype,
                generator=generator,
            )
        # the adapter just added is the one in use (switch with llamaforge.core.finetune.set_adapter)
        for module in model.modules():
            if isinstance(module, AdapterLayer):
                module.set_active_adapters([name] if name in module.adapter_names() else [])
        return model


@hookimpl
def llamaforge_register(register):
    register("adapter", "lora", LoRA)
