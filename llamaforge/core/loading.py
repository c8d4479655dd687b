"""Saving and loading models.

A llamaforge model directory holds `spec.yaml` and `model.safetensors` (plus tokenizer files and, for runs,
training state). Anything else is handed to the registered importers (Hugging Face directories, and whatever
third-party plugins add), so every command that takes MODEL accepts every format an importer understands.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from llamaforge.core.io import atomic_write_json, load_safetensors, save_safetensors
from llamaforge.core.model import LlamaForgeModel, build_model, torch_dtype
from llamaforge.core.spec import ModelSpec, load_spec
from llamaforge.errors import ModelFileError

SPEC_FILE = "spec.yaml"
WEIGHTS_FILE = "model.safetensors"
TRANSFORMS_FILE = "transforms.json"
_TRANSFORMS_ATTR = "_llamaforge_transforms"


def apply_transform(model: LlamaForgeModel, kind: str, name: str, **params: Any) -> LlamaForgeModel:
    """Apply a registered post-build transform (quantizer, adapter...) and remember it, so that `save_model`
    records it and `load_model` rebuilds the same module structure before loading the saved tensors.

    The component's factory is called with `params`; the product's `apply(model)` does the work in place.
    """
    from llamaforge.registry.manager import lookup

    entry = lookup(kind, name)
    component = entry.factory(**params)
    result = component.apply(model)
    target = result if isinstance(result, LlamaForgeModel) else model
    records = list(getattr(target, _TRANSFORMS_ATTR, []))
    records.append({"kind": kind, "name": name, "params": params})
    setattr(target, _TRANSFORMS_ATTR, records)
    return target


def transforms_of(model: LlamaForgeModel) -> list[dict[str, Any]]:
    return list(getattr(model, _TRANSFORMS_ATTR, []))


def forget_transform(model: LlamaForgeModel, kind: str, name: str | None = None) -> None:
    """Drop records of a kind (e.g. after merging and removing an adapter)."""
    records = [r for r in transforms_of(model) if not (r["kind"] == kind and (name is None or r["name"] == name))]
    setattr(model, _TRANSFORMS_ATTR, records)


def save_model(
    model: LlamaForgeModel,
    out: str | Path,
    *,
    metadata: dict[str, str] | None = None,
    state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write spec.yaml + model.safetensors into `out` (atomically, file by file).

    `state` replaces `model.state_dict()` (a sharded model's gathered full state dict)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.spec.save(out / SPEC_FILE)
    records = transforms_of(model)
    if records:
        atomic_write_json(out / TRANSFORMS_FILE, records)
    else:
        (out / TRANSFORMS_FILE).unlink(missing_ok=True)
    meta = {"format": "llamaforge", **(metadata or {})}
    save_safetensors(out / WEIGHTS_FILE, model.state_dict() if state is None else state, metadata=meta)
    return out


def is_llamaforge_dir(path: Path) -> bool:
    return path.is_dir() and (path / SPEC_FILE).exists() and (path / WEIGHTS_FILE).exists()


def find_importer(path: Path):
    from llamaforge.registry import registries

    for entry in registries().importer:
        importer = entry.factory()
        if importer.can_load(path):
            return entry.name, importer
    return None, None


def load_state_into(model: LlamaForgeModel, state: dict[str, torch.Tensor], *, source: str) -> LlamaForgeModel:
    """Copy `state` into `model`, failing loudly on any missing, unexpected or mis-shaped tensor."""
    if getattr(model.lm_head, "tied", False) and "lm_head.weight" not in state:
        state = dict(state)
        if "model.embed_tokens.weight" in state:
            state["lm_head.weight"] = state["model.embed_tokens.weight"]
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensors (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} tensors (e.g. {unexpected[:3]})")
        raise ModelFileError(f"{source} does not match its spec: " + "; ".join(parts))
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise ModelFileError(
                f"{source}: tensor {name} has shape {tuple(tensor.shape)}, the spec needs {tuple(expected[name].shape)}"
            )
    model.load_state_dict(state, strict=True)
    return model


def load_model(
    path: str | Path,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> LlamaForgeModel:
    """Load a llamaforge run/model directory or anything a registered importer reads (e.g. a HF directory)."""
    path = Path(path)
    if not path.exists():
        raise ModelFileError(f"model path {path} does not exist")
    if is_llamaforge_dir(path):
        spec = load_spec(path / SPEC_FILE)
        state = load_safetensors(path / WEIGHTS_FILE)
        source = str(path / WEIGHTS_FILE)
        if (path / TRANSFORMS_FILE).exists():
            return _load_transformed(path, spec, state, source=source, device=device, dtype=dtype)
    else:
        name, importer = find_importer(path)
        if importer is None:
            from llamaforge.registry import registries

            raise ModelFileError(
                f"{path} is not a llamaforge model directory (spec.yaml + model.safetensors) and no importer "
                f"recognises it (importers: {', '.join(registries().importer.names())})"
            )
        spec = importer.load_spec(path)
        state = importer.load_state_dict(path, spec)
        source = f"{path} (read by importer {name!r})"
    return _materialise(spec, state, source=source, device=device, dtype=dtype)


def _materialise(
    spec: ModelSpec,
    state: dict[str, torch.Tensor],
    *,
    source: str,
    device: str | torch.device | None,
    dtype: str | torch.dtype | None,
) -> LlamaForgeModel:
    target = torch_dtype(dtype) if dtype is not None else None
    model = build_model(spec, device="meta")
    model.to_empty(device=device or "cpu")
    if getattr(model.lm_head, "tied", False):  # to_empty gives each module its own tensor: tie the head again
        model.lm_head.weight = model.model.embed_tokens.weight
    if target is None:
        # keep the checkpoint's precision (a bf16 checkpoint stays bf16) unless the caller asks otherwise
        floats = [t.dtype for t in state.values() if t.is_floating_point()]
        target = floats[0] if floats else torch_dtype(spec.dtype)
    model.to(dtype=target)
    state = {k: v.to(dtype=target) if v.is_floating_point() else v for k, v in state.items()}
    load_state_into(model, state, source=source)
    # non-persistent buffers (e.g. RoPE frequencies) were left uninitialised by to_empty: components recompute them
    for module in model.modules():
        reset = getattr(module, "reset_buffers", None)
        if callable(reset):
            reset()
    return model.eval()


def _load_transformed(
    path: Path,
    spec: ModelSpec,
    state: dict[str, torch.Tensor],
    *,
    source: str,
    device: str | torch.device | None,
    dtype: str | torch.dtype | None = None,
) -> LlamaForgeModel:
    """Rebuild the transformed structure (quantized / adapted modules), then load the saved tensors into it."""
    try:
        records = json.loads((path / TRANSFORMS_FILE).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ModelFileError(f"{path / TRANSFORMS_FILE} is not valid JSON: {exc}") from None
    model = build_model(spec, init=False, dtype=dtype)  # quantized modules take their compute dtype from it
    for record in records:
        try:
            model = apply_transform(model, record["kind"], record["name"], **record.get("params", {}))
        except KeyError as exc:
            raise ModelFileError(f"{path / TRANSFORMS_FILE}: malformed record {record!r} ({exc})") from None
    load_state_into(model, state, source=source)
    if device is not None:
        model.to(device)
    return model.eval()


def model_from_state(spec: ModelSpec | str, state: dict[str, Any], **kwargs: Any) -> LlamaForgeModel:
    return _materialise(load_spec(spec), state, source="state dict", **kwargs)


def load_model_and_tokenizer(
    path: str | Path,
    *,
    tokenizer: str | Path | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    require_tokenizer: bool = False,
) -> tuple[LlamaForgeModel, Any]:
    """A model plus the tokenizer stored beside it (or the one given); the tokenizer is None when there is none."""
    from llamaforge.core.llama2c import find_tokenizer  # also llama2.c's tokenizer.bin, given or beside a .bin

    model = load_model(path, device=device, dtype=dtype)
    tok = find_tokenizer(path, tokenizer)
    if tok is None and require_tokenizer:
        raise ModelFileError(f"{path} has no tokenizer files; pass --tokenizer PATH (or use --prompt-ids)")
    if tok is not None and tok.vocab_size > model.spec.vocab_size:
        raise ModelFileError(
            f"tokenizer has {tok.vocab_size} entries but the model's vocab_size is {model.spec.vocab_size}; "
            f"they do not belong together"
        )
    return model, tok
