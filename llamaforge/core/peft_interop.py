"""LoRA adapters to and from Hugging Face PEFT's directory format.

Module names inside a llamaforge model are Hugging Face Llama's, so a PEFT adapter for the exported model is the
same tensors under `base_model.model.<module>.lora_{A,B}.weight` plus an adapter_config.json. Import is strict:
every tensor must land on an existing linear layer with the right shape, and every configured target must exist,
so an adapter made for another architecture fails with a message instead of loading partially.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llamaforge.core.finetune import (
    AdapterError,
    _record_of,
    adapter_layers,
    adapter_parameters,
    adapter_state_dict,
    add_adapter,
    linear_features,
    load_adapter_state_dict,
)

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<factor>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")
# PEFT features with no llamaforge equivalent: loading such an adapter as plain LoRA would silently change it
_UNSUPPORTED = {
    "use_dora": "DoRA",
    "lora_bias": "LoRA bias terms",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D-style) weights",
    "modules_to_save": "fully trained extra modules (modules_to_save)",
    "rank_pattern": "per-module ranks (rank_pattern)",
    "alpha_pattern": "per-module alphas (alpha_pattern)",
    "layer_replication": "layer replication",
    "target_parameters": "parameter targets",
    "trainable_token_indices": "trainable token indices",
    "use_qalora": "QA-LoRA",
    "alora_invocation_tokens": "activated LoRA",
}


def _linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if n and ".lora_" not in n and linear_features(m) is not None]


def compact_targets(model: nn.Module, modules: list[str]) -> list[str]:
    """Short names (q_proj, ...) when they select exactly `modules`, else the full module names."""
    shorts = sorted({m.rsplit(".", 1)[-1] for m in modules})
    selected = {n for n in _linear_names(model) if n.rsplit(".", 1)[-1] in shorts}
    return shorts if selected == set(modules) else sorted(modules)


def export_peft(
    model: nn.Module, out: str | Path, name: str = "default", *, base_model_name_or_path: str | None = None
) -> Path:
    """Write adapter `name` as a PEFT LoRA directory for the Hugging Face export of the same base model."""
    from llamaforge.core.io import atomic_write_json, save_safetensors

    record = _record_of(model, name)
    if record["name"] != "lora":
        raise AdapterError(f"adapter {name!r} is a {record['name']!r} adapter; only LoRA adapters export to PEFT")
    spec = getattr(model, "spec", None)
    if spec is not None:
        from llamaforge.core.hf_config import hf_config_from_spec

        hf_config_from_spec(spec)  # raises when the base has no transformers equivalent
    from llamaforge.registry.manager import lookup

    lora = lookup("adapter", "lora").factory(**record["params"])  # the parameters with their defaults filled in
    state = adapter_state_dict(model, name)
    modules = sorted({k.rsplit(".", 2)[0] for k in state})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": int(lora.rank),
        "lora_alpha": float(lora.alpha),
        "lora_dropout": float(lora.dropout),
        "use_rslora": bool(lora.rslora),
        "target_modules": compact_targets(model, modules),
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_dora": False,
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {PEFT_PREFIX + k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    save_safetensors(out / PEFT_WEIGHTS, tensors, metadata={"format": "pt"})
    atomic_write_json(out / PEFT_CONFIG, config)
    return out


def read_peft(adapter_dir: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(adapter_config.json, tensors) of a PEFT directory, validated as a plain LoRA adapter."""
    adapter_dir = Path(adapter_dir)
    cfg_path = adapter_dir / PEFT_CONFIG
    if not cfg_path.exists():
        raise AdapterError(f"{adapter_dir} is not a PEFT adapter directory (no {PEFT_CONFIG})")
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise AdapterError(f"{cfg_path} is not valid JSON: {exc}") from None
    if str(config.get("peft_type", "")).upper() != "LORA":
        raise AdapterError(f"{cfg_path}: peft_type {config.get('peft_type')!r} is not supported; only LORA adapters")
    used = [desc for key, desc in _UNSUPPORTED.items() if config.get(key) not in (None, False, {}, [], "none")]
    if config.get("bias", "none") != "none":
        used.append(f"bias={config['bias']!r}")
    if used:
        raise AdapterError(f"{adapter_dir} uses {', '.join(used)}, which llamaforge's LoRA does not support")
    if (adapter_dir / PEFT_WEIGHTS).exists():
        from llamaforge.core.io import load_safetensors

        tensors = load_safetensors(adapter_dir / PEFT_WEIGHTS)
    elif (adapter_dir / "adapter_model.bin").exists():
        tensors = torch.load(adapter_dir / "adapter_model.bin", map_location="cpu", weights_only=True)
    else:
        raise AdapterError(f"{adapter_dir} has no {PEFT_WEIGHTS} (or adapter_model.bin)")
    return config, tensors


def _peft_state(tensors: dict[str, torch.Tensor], source: Path) -> dict[str, torch.Tensor]:
    """PEFT keys -> llamaforge adapter keys (`<module>.lora_A.weight`); anything unexpected is an error."""
    state: dict[str, torch.Tensor] = {}
    strange: list[str] = []
    for key, tensor in tensors.items():
        local = key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key
        if ".base_layer." in local:  # base weights PEFT saves beside adapters on embedding-tied layers
            continue
        match = _KEY.match(local)
        if match is None:
            strange.append(key)
            continue
        state[f"{match['module']}.lora_{match['factor']}.weight"] = tensor
    if strange:
        raise AdapterError(f"{source}: tensors that are not LoRA A/B factors of linear layers: {strange[:3]}")
    if not state:
        raise AdapterError(f"{source} holds no LoRA tensors")
    return state


def _check_targets(model: nn.Module, config: dict[str, Any], modules: list[str], source: Path) -> None:
    names = _linear_names(model)
    missing = [m for m in modules if m not in names]
    if missing:
        shorts = sorted({n.rsplit(".", 1)[-1] for n in names})
        raise AdapterError(
            f"{source} adapts modules this model does not have as linear layers: {missing[:3]} "
            f"(linear layers here: {', '.join(shorts)}); was it trained for another architecture?"
        )
    targets = config.get("target_modules")
    if isinstance(targets, str):
        if not any(re.fullmatch(targets, n) for n in names):
            raise AdapterError(f"{source}: target_modules regex {targets!r} matches no module of this model")
    elif isinstance(targets, list):
        unknown = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
        if unknown:
            raise AdapterError(
                f"{source}: target_modules {unknown} match no linear layer of this model "
                f"(linear layers here: {', '.join(sorted({n.rsplit('.', 1)[-1] for n in names}))})"
            )


def import_peft(
    model: nn.Module, adapter_dir: str | Path, *, name: str = "default", trainable: bool = False
) -> nn.Module:
    """Attach a PEFT LoRA adapter (saved for the transformers twin of `model`) as llamaforge adapter `name`."""
    adapter_dir = Path(adapter_dir)
    config, tensors = read_peft(adapter_dir)
    state = _peft_state(tensors, adapter_dir)
    modules = sorted({k.rsplit(".", 2)[0] for k in state})
    _check_targets(model, config, modules, adapter_dir)
    rank = int(config.get("r", 8))
    for key, tensor in state.items():
        if key.endswith("lora_A.weight") and tensor.shape[0] != rank:
            raise AdapterError(f"{adapter_dir}: {key} has rank {tensor.shape[0]}, adapter_config.json says r={rank}")
    device = next((t.device for t in (*model.parameters(), *model.buffers())), torch.device("cpu"))
    add_adapter(
        model,
        "lora",
        name=name,
        rank=rank,
        alpha=float(config.get("lora_alpha", 8)),
        dropout=float(config.get("lora_dropout", 0.0) or 0.0),
        targets=compact_targets(model, modules),
        rslora=bool(config.get("use_rslora", False)),
    )
    try:
        load_adapter_state_dict(model, {k: v.to(device) for k, v in state.items()}, name)
    except AdapterError:
        from llamaforge.core.finetune import remove_adapter

        remove_adapter(model, name)
        raise
    for p in adapter_parameters(model, name):
        p.requires_grad_(trainable)
    return model


__all__ = ["adapter_layers", "compact_targets", "export_peft", "import_peft", "read_peft"]
