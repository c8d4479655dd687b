"""Adapters on a built model, and fine-tuning them.

Model-level adapter operations (add, switch, disable, merge, unmerge, remove, save, load) work on any module that
implements `AdapterLayer`, whatever registered adapter wrapped it; adapter-only checkpoints are an `adapter.json`
(type, parameters, wrapped modules, the base's shape) plus `adapter.safetensors`. Fine-tuning data is either
Alpaca-style instruction records rendered through a prompt template, with the loss on response tokens only, or
plain text packed into blocks (domain adaptation). The training loop is deliberately small: AdamW over the adapter's
parameters only (the base is frozen and the optimizer never sees it), gradient clipping, warmup + cosine decay.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llamaforge.core.interfaces import AdapterLayer
from llamaforge.core.model import eval_mode
from llamaforge.errors import LlamaforgeError

ADAPTER_CONFIG = "adapter.json"
ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_FORMAT = "llamaforge-adapter"
IGNORE_INDEX = -100
_BASE_FIELDS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size")


class AdapterError(LlamaforgeError, ValueError):
    """An adapter cannot be added, loaded, merged or removed as asked; the message says why and what to do."""


class AdapterFactor(nn.Module):
    """One low-rank factor. Deliberately not an nn.Linear, so code that walks a model for Linear layers
    (quantizers, weight init, other adapters' target matching) never mistakes it for a base layer."""

    def __init__(self, out_features: int, in_features: int, device: Any, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))

    def extra_repr(self) -> str:
        return f"{self.weight.shape[1]} -> {self.weight.shape[0]}"


def linear_features(module: nn.Module) -> tuple[int, int] | None:
    """(in_features, out_features) of anything that acts as a linear map on the last dimension, else None."""
    if isinstance(module, nn.Embedding | AdapterFactor):
        return None
    fin, fout = getattr(module, "in_features", None), getattr(module, "out_features", None)
    if isinstance(fin, int) and isinstance(fout, int):
        return fin, fout
    projection = getattr(module, "projection", None)
    if callable(projection):  # output heads that are a plain projection
        proj = projection()
        if proj is not None and proj[0].dim() == 2:
            return int(proj[0].shape[1]), int(proj[0].shape[0])
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.is_floating_point():
        return int(weight.shape[1]), int(weight.shape[0])
    return None


# ----- model-level adapter operations ---------------------------------------------------------------------------
def adapter_layers(model: nn.Module) -> dict[str, AdapterLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, AdapterLayer)}


def adapter_names(model: nn.Module) -> list[str]:
    names: list[str] = []
    for layer in adapter_layers(model).values():
        names.extend(n for n in layer.adapter_names() if n not in names)
    return names


def _require_adapter(model: nn.Module, name: str) -> None:
    present = adapter_names(model)
    if name not in present:
        raise AdapterError(f"the model has no adapter named {name!r} (it has: {', '.join(present) or 'none'})")


def add_adapter(model: nn.Module, kind: str = "lora", name: str = "default", **params: Any) -> nn.Module:
    """Wrap the modules a registered adapter selects (recorded, so save_model/load_model keep the structure);
    the new adapter becomes the active one."""
    from llamaforge.core.loading import apply_transform

    if name in adapter_names(model):
        raise AdapterError(f"the model already has an adapter named {name!r}; remove it or pick another name")
    return apply_transform(model, "adapter", kind, adapter_name=name, **params)  # type: ignore[arg-type]


def active_adapters(model: nn.Module) -> list[str]:
    names: list[str] = []
    for layer in adapter_layers(model).values():
        names.extend(n for n in getattr(layer, "_lora_active", []) if n not in names)
    return names


def set_adapter(model: nn.Module, names: str | list[str]) -> None:
    """Make `names` the adapters in use (several are summed). Merged adapters must be unmerged first."""
    wanted = [names] if isinstance(names, str) else list(names)
    for name in wanted:
        _require_adapter(model, name)
    for layer in adapter_layers(model).values():
        merged = [n for n in getattr(layer, "_lora_merged", []) if n not in wanted]
        if merged:
            raise AdapterError(f"adapter(s) {merged} are merged into the base weights; unmerge before switching")
    for layer in adapter_layers(model).values():
        layer.set_active_adapters([n for n in wanted if n in layer.adapter_names()])


def _set_enabled(model: nn.Module, enabled: bool) -> None:
    layers = adapter_layers(model).values()
    if not enabled and any(getattr(layer, "_lora_merged", []) for layer in layers):
        raise AdapterError("adapters are merged into the base weights; unmerge them before disabling")
    for layer in layers:
        layer.adapters_enabled = enabled


def disable_adapters(model: nn.Module) -> None:
    """The base model's behaviour with adapters still attached (e.g. to compare, or as a reference policy)."""
    _set_enabled(model, False)


def enable_adapters(model: nn.Module) -> None:
    _set_enabled(model, True)


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    disable_adapters(model)
    try:
        yield model
    finally:
        enable_adapters(model)


def _check_untied(model: nn.Module, layers: dict[str, AdapterLayer]) -> None:
    """Merging into a weight shared with another module (a tied head and embedding) would change both."""
    owners: dict[int, list[str]] = {}
    for mod_name, module in model.named_modules(remove_duplicate=False):
        for pname, p in module.named_parameters(recurse=False, remove_duplicate=False):
            owners.setdefault(id(p), []).append(f"{mod_name}.{pname}" if mod_name else pname)
    for name, layer in layers.items():
        weight = getattr(layer, "weight", None)
        if isinstance(weight, nn.Parameter) and len(owners.get(id(weight), [])) > 1:
            raise AdapterError(
                f"cannot merge into {name}: its weight is shared with {owners[id(weight)]} (tied embeddings). "
                f"Keep this adapter unmerged, or train it without the head target"
            )


def merge_adapters(model: nn.Module, names: list[str] | None = None, *, keep_original: bool = True) -> None:
    """Fold the (active, or named) adapters into the base weights: inference then costs nothing extra.
    `keep_original` keeps an exact copy of each merged weight so `unmerge_adapters` restores it bitwise."""
    layers = adapter_layers(model)
    for name in names or []:
        _require_adapter(model, name)
    targets = {
        n: layer for n, layer in layers.items() if set(names or layer.adapter_names()) & set(layer.adapter_names())
    }
    _check_untied(model, targets)
    for layer in targets.values():
        wanted = [n for n in (names or getattr(layer, "_lora_active", [])) if n in layer.adapter_names()]
        layer.merge(wanted, keep_original=keep_original)


def unmerge_adapters(model: nn.Module) -> None:
    for layer in adapter_layers(model).values():
        layer.unmerge()


def _drop_records(model: nn.Module, name: str | None) -> None:
    from llamaforge.core import loading

    records = [
        r
        for r in loading.transforms_of(model)  # type: ignore[arg-type]
        if not (r["kind"] == "adapter" and (name is None or r.get("params", {}).get("adapter_name", "default") == name))
    ]
    setattr(model, loading._TRANSFORMS_ATTR, records)


def remove_adapter(model: nn.Module, name: str | None = None) -> None:
    """Take an adapter (all of them when `name` is None) off the model; with the last one gone every wrapped
    module is again exactly the module it was (class and bitwise weights)."""
    names = [name] if name is not None else adapter_names(model)
    for n in names:
        _require_adapter(model, n)
        for layer in adapter_layers(model).values():
            if n in layer.adapter_names():
                layer.remove(n)
        _drop_records(model, n)


def merge_and_remove(model: nn.Module, names: list[str] | None = None) -> nn.Module:
    """Merge for good and drop every adapter: a plain model that any exporter or loader handles."""
    merge_adapters(model, names, keep_original=False)
    remove_adapter(model)
    return model


def adapter_parameters(model: nn.Module, name: str | None = None) -> list[nn.Parameter]:
    params: list[nn.Parameter] = []
    for layer in adapter_layers(model).values():
        for n in layer.adapter_names():
            if name is None or n == name:
                params.extend(layer.adapter_parameters(n))
    return params


def mark_only_adapter_trainable(model: nn.Module, name: str) -> list[nn.Parameter]:
    """Freeze everything except adapter `name`; returns its parameters (what the optimizer gets)."""
    _require_adapter(model, name)
    for p in model.parameters():
        p.requires_grad_(False)
    params = adapter_parameters(model, name)
    for p in params:
        p.requires_grad_(True)
    return params


def adapter_state_dict(model: nn.Module, name: str = "default") -> dict[str, torch.Tensor]:
    """`{module}.{local key}` -> tensor, e.g. model.layers.0.self_attn.q_proj.lora_A.weight (no adapter name)."""
    _require_adapter(model, name)
    state: dict[str, torch.Tensor] = {}
    for module_name, layer in adapter_layers(model).items():
        if name in layer.adapter_names():
            for key, t in layer.adapter_state_dict(name).items():
                state[f"{module_name}.{key}"] = t
    return state


def load_adapter_state_dict(model: nn.Module, state: dict[str, torch.Tensor], name: str = "default") -> None:
    """Strict: every tensor must land on a layer carrying adapter `name`, and every such layer must get its tensors."""
    layers = {n: layer for n, layer in adapter_layers(model).items() if name in layer.adapter_names()}
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    stray: list[str] = []
    for key, tensor in state.items():
        owner = max((m for m in layers if key.startswith(m + ".")), key=len, default=None)
        if owner is None:
            stray.append(key)
            continue
        grouped.setdefault(owner, {})[key[len(owner) + 1 :]] = tensor
    missing = sorted(set(layers) - set(grouped))
    if stray or missing:
        parts = []
        if stray:
            parts.append(f"{len(stray)} tensors for modules this adapter does not wrap (e.g. {stray[:3]})")
        if missing:
            parts.append(f"no tensors for {len(missing)} wrapped modules (e.g. {missing[:3]})")
        raise AdapterError(f"adapter {name!r} does not fit this model: " + "; ".join(parts))
    for module_name, local in grouped.items():
        layers[module_name].load_adapter_state_dict(name, local)


def _record_of(model: nn.Module, name: str) -> dict[str, Any]:
    from llamaforge.core.loading import transforms_of

    for record in transforms_of(model):  # type: ignore[arg-type]
        if record["kind"] == "adapter" and record.get("params", {}).get("adapter_name", "default") == name:
            return record
    raise AdapterError(
        f"adapter {name!r} was not added through add_adapter/load_adapter, so its type and parameters are unknown; "
        f"add it with llamaforge.core.finetune.add_adapter"
    )


def base_signature(model: nn.Module) -> dict[str, Any]:
    spec = getattr(model, "spec", None)
    return {f: getattr(spec, f if f != "n_kv_heads" else "kv_heads", None) for f in _BASE_FIELDS} if spec else {}


def save_adapter(
    model: nn.Module, out: str | Path, name: str = "default", *, extra: dict[str, Any] | None = None
) -> Path:
    """Write adapter `name` alone (kilobytes to megabytes): adapter.json + adapter.safetensors."""
    from llamaforge.core.io import atomic_write_json, save_safetensors

    record = _record_of(model, name)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in adapter_state_dict(model, name).items()}
    params = {k: v for k, v in record["params"].items() if k not in ("adapter_name", "seed")}
    from llamaforge.registry.manager import lookup

    component = lookup("adapter", record["name"]).factory(**record["params"])
    if callable(getattr(component, "config", None)):  # the full parameters, defaults and shorthands resolved
        params = component.config()
    config = {
        "format": ADAPTER_FORMAT,
        "version": 1,
        "type": record["name"],
        "params": params,
        "modules": sorted({k.rsplit(".", 2)[0] for k in state}),
        "base": base_signature(model),
        **(extra or {}),
    }
    save_safetensors(out / ADAPTER_WEIGHTS, state, metadata={"format": ADAPTER_FORMAT, "type": record["name"]})
    atomic_write_json(out / ADAPTER_CONFIG, config)
    return out


def read_adapter_config(adapter_dir: str | Path) -> dict[str, Any]:
    path = Path(adapter_dir) / ADAPTER_CONFIG
    if not path.exists():
        raise AdapterError(
            f"{adapter_dir} is not an adapter directory (no {ADAPTER_CONFIG}; a PEFT adapter has adapter_config.json)"
        )
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise AdapterError(f"{path} is not valid JSON: {exc}") from None
    if config.get("format") != ADAPTER_FORMAT:
        raise AdapterError(f"{path} is not a llamaforge adapter config (format {config.get('format')!r})")
    return config


def load_adapter(
    model: nn.Module, adapter_dir: str | Path, *, name: str | None = None, trainable: bool = False
) -> nn.Module:
    """Attach the adapter saved in `adapter_dir` (llamaforge format, or a PEFT LoRA directory) to `model` and make
    it the active one. `name` defaults to the saved name ("default"); `trainable=False` leaves it frozen."""
    from llamaforge.core.io import load_safetensors

    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise AdapterError(f"adapter directory {adapter_dir} does not exist")
    if not (adapter_dir / ADAPTER_CONFIG).exists() and (adapter_dir / "adapter_config.json").exists():
        from llamaforge.core.peft_interop import import_peft

        return import_peft(model, adapter_dir, name=name or "default", trainable=trainable)
    config = read_adapter_config(adapter_dir)
    expected = config.get("base") or {}
    actual = base_signature(model)
    clash = {k: (v, actual.get(k)) for k, v in expected.items() if k in actual and actual[k] != v}
    if clash:
        detail = ", ".join(f"{k}: adapter {a}, model {b}" for k, (a, b) in clash.items())
        raise AdapterError(f"adapter {adapter_dir} was trained on a different base model ({detail})")
    name = name or "default"
    device = _first_device(model)
    add_adapter(model, config["type"], name=name, **config.get("params", {}))
    state = load_safetensors(adapter_dir / ADAPTER_WEIGHTS, device=device)
    load_adapter_state_dict(model, state, name)
    for p in adapter_parameters(model, name):
        p.requires_grad_(trainable)
    return model


def _first_device(model: nn.Module) -> torch.device:
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


# ----- instruction data -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PromptTemplate:
    """How an instruction record becomes a prompt; the response follows it and carries the loss."""

    with_input: str
    without_input: str

    def render(self, record: dict[str, Any]) -> str:
        fields = {
            "instruction": str(record.get("instruction", "")).strip(),
            "input": str(record.get("input", "")).strip(),
        }
        template = self.with_input if fields["input"] else self.without_input
        return template.format(**fields)


TEMPLATES: dict[str, PromptTemplate] = {
    "alpaca": PromptTemplate(
        with_input=(
            "Below is an instruction that describes a task, paired with an input that provides further context. "
            "Write a response that appropriately completes the request.\n\n"
            "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
        ),
        without_input=(
            "Below is an instruction that describes a task. Write a response that appropriately completes the "
            "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
        ),
    ),
}


def read_instructions(path: str | Path) -> list[dict[str, Any]]:
    """Alpaca-format records (a JSON list, or JSON lines) with `instruction`, optional `input`, and `output`."""
    path = Path(path)
    if not path.is_file():
        raise AdapterError(f"instruction data {path} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        records = (
            json.loads(text)
            if text.lstrip().startswith("[")
            else [json.loads(x) for x in text.splitlines() if x.strip()]
        )
    except json.JSONDecodeError as exc:
        raise AdapterError(f"{path} is not JSON / JSON lines: {exc}") from None
    for i, rec in enumerate(records):
        if not isinstance(rec, dict) or "instruction" not in rec or "output" not in rec:
            raise AdapterError(f"{path}: record {i} lacks 'instruction' or 'output' (Alpaca format expected)")
    if not records:
        raise AdapterError(f"{path} holds no records")
    return records


@dataclass
class Example:
    """inputs (T,) and aligned targets (T,): targets[t] is the token after inputs[t], -100 on prompt tokens."""

    inputs: torch.Tensor
    targets: torch.Tensor


def encode_instruction(tokenizer: Any, prompt: str, response: str, max_len: int) -> Example | None:
    """BOS + prompt + response + EOS, cut to `max_len` + 1 tokens; None when no response token would remain.

    Prompt and response are encoded separately so the boundary is exact: every target inside the prompt is -100."""
    prompt_ids = tokenizer.encode(prompt, bos=tokenizer.bos_id is not None)
    response_ids = tokenizer.encode(response, eos=tokenizer.eos_id is not None)
    ids = (prompt_ids + response_ids)[: max_len + 1]
    if len(ids) <= len(prompt_ids):
        return None
    seq = torch.tensor(ids, dtype=torch.int64)
    targets = seq[1:].clone()
    targets[: len(prompt_ids) - 1] = IGNORE_INDEX  # targets[t] = ids[t+1]; prompt tokens sit at ids[1:len(prompt)]
    return Example(inputs=seq[:-1], targets=targets)


def instruction_examples(
    records: list[dict[str, Any]], tokenizer: Any, *, max_len: int, template: str | PromptTemplate = "alpaca"
) -> list[Example]:
    tmpl = TEMPLATES[template] if isinstance(template, str) else template
    out = []
    for rec in records:
        ex = encode_instruction(tokenizer, tmpl.render(rec), str(rec["output"]), max_len)
        if ex is not None:
            out.append(ex)
    if not out:
        raise AdapterError(f"no instruction fits in {max_len} tokens with room for a response; raise --seq-len")
    return out


def collate(examples: list[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest example: causal attention means padding after a row never affects it."""
    length = max(ex.inputs.numel() for ex in examples)
    inputs = torch.full((len(examples), length), pad_id, dtype=torch.int64)
    targets = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.int64)
    for i, ex in enumerate(examples):
        inputs[i, : ex.inputs.numel()] = ex.inputs
        targets[i, : ex.targets.numel()] = ex.targets
    return inputs, targets


def example_batches(
    examples: list[Example], *, batch_size: int, pad_id: int, seed: int = 0
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless shuffled batches, reshuffled each epoch from (seed, epoch)."""
    epoch = 0
    while True:
        order = list(range(len(examples)))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        for start in range(0, len(order) - batch_size + 1 if len(order) >= batch_size else 1, batch_size):
            yield collate([examples[i] for i in order[start : start + batch_size]], pad_id)
        epoch += 1


@torch.no_grad()
def evaluate_examples(model: nn.Module, examples: list[Example], *, batch_size: int = 8, pad_id: int = 0) -> float:
    """Mean loss per response token over `examples`."""
    device = _first_device(model)
    total, count = 0.0, 0
    with eval_mode(model):
        for start in range(0, len(examples), batch_size):
            inputs, targets = collate(examples[start : start + batch_size], pad_id)
            n = int((targets != IGNORE_INDEX).sum())
            if n == 0:
                continue
            loss = model(inputs.to(device), targets.to(device), return_logits=False).loss
            total += float(loss) * n
            count += n
    return total / max(1, count)


# ----- the training loop ----------------------------------------------------------------------------------------
@dataclass
class FinetuneConfig:
    steps: int = 200
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    batch_size: int = 8
    seq_len: int = 256
    eval_every: int = 50
    eval_batches: int = 20
    log_every: int = 10
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"  # auto (bf16 autocast on CUDA), fp32, bf16
    activation_checkpointing: bool = False

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.seq_len < 2 or self.lr <= 0:
            raise AdapterError("steps, batch_size must be >= 1, seq_len >= 2 and lr > 0")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise AdapterError(f"precision must be auto, fp32 or bf16, got {self.precision!r}")


def lr_schedule(config: FinetuneConfig, step: int) -> float:
    """Linear warmup, then cosine decay from lr to lr * min_lr_ratio at the last step."""
    warm = min(config.warmup_steps, max(0, config.steps - 1))
    if warm and step < warm:
        return config.lr * (step + 1) / warm
    progress = min(1.0, (step - warm) / max(1, config.steps - warm - 1))
    floor = config.lr * config.min_lr_ratio
    return floor + 0.5 * (config.lr - floor) * (1 + math.cos(math.pi * progress))


@dataclass
class FinetuneResult:
    steps: int
    train_loss: float
    val_loss_before: float | None
    val_loss: float | None
    trainable_params: int
    tokens: int
    seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def adapter_optimizer(params: list[nn.Parameter], config: FinetuneConfig, *, fused: bool = False) -> torch.optim.AdamW:
    """AdamW over exactly `params` (the adapter's): frozen base weights never get optimizer state."""
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay}]
    rest = [p for p in params if p.dim() < 2]
    if rest:
        groups.append({"params": rest, "weight_decay": 0.0})
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.999), fused=fused)


def finetune(
    model: nn.Module,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    config: FinetuneConfig,
    *,
    adapter: str = "default",
    evaluate: Callable[[nn.Module], float] | None = None,
    progress: bool = False,
) -> FinetuneResult:
    """Train adapter `adapter` on `batches` of (inputs, aligned targets); everything else stays frozen."""
    from llamaforge.core.train import resolve_device

    device = resolve_device(config.device)
    model.to(device)
    params = mark_only_adapter_trainable(model, adapter)
    set_adapter(model, adapter)
    autocast = config.precision == "bf16" or (config.precision == "auto" and device.type == "cuda")
    if config.activation_checkpointing:
        model.gradient_checkpointing = True  # type: ignore[assignment]
    optimizer = adapter_optimizer(params, config, fused=device.type == "cuda")
    torch.manual_seed(config.seed)

    val_before = evaluate(model) if evaluate is not None else None
    history: list[dict[str, Any]] = []
    model.train()
    start = time.perf_counter()
    tokens = 0
    window, window_n, train_loss = 0.0, 0, float("nan")
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.steps, unit="step", dynamic_ncols=True)
    val_loss = val_before
    for step in range(config.steps):
        lr = lr_schedule(config, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        inputs, targets = next(batches)
        inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = model(inputs, targets, return_logits=False).loss
        loss.backward()
        if config.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += int((targets != IGNORE_INDEX).sum())
        window += float(loss.detach())
        window_n += 1
        last = step + 1 == config.steps
        if (step + 1) % config.log_every == 0 or last:
            train_loss = window / window_n
            record: dict[str, Any] = {"step": step + 1, "lr": lr, "train_loss": train_loss}
            if evaluate is not None and ((step + 1) % config.eval_every == 0 or last):
                val_loss = evaluate(model)
                model.train()
                record["val_loss"] = val_loss
            record["tokens_per_s"] = tokens / max(1e-9, time.perf_counter() - start)
            history.append(record)
            window, window_n = 0.0, 0
            if bar is not None:
                bar.set_postfix(loss=f"{train_loss:.3f}", **({"val": f"{val_loss:.3f}"} if val_loss else {}))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    model.gradient_checkpointing = False  # type: ignore[assignment]
    model.eval()
    return FinetuneResult(
        steps=config.steps,
        train_loss=train_loss,
        val_loss_before=val_before,
        val_loss=val_loss,
        trainable_params=sum(p.numel() for p in params),
        tokens=tokens,
        seconds=time.perf_counter() - start,
        history=history,
    )


def _pad_id(tokenizer: Any) -> int:
    for candidate in (tokenizer.pad_id, tokenizer.eos_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0


def detect_format(data: str | Path) -> str:
    suffix = Path(data).suffix.lower()
    return "alpaca" if suffix in (".json", ".jsonl") else "text"


def train_lora(
    model: nn.Module,
    tokenizer: Any,
    data: str | Path,
    out: str | Path | None = None,
    *,
    data_format: str = "auto",
    name: str = "default",
    rank: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    targets: str | list[str] = "q_proj,v_proj",
    rslora: bool = False,
    config: FinetuneConfig | None = None,
    val_fraction: float = 0.05,
    template: str = "alpaca",
    progress: bool = False,
) -> FinetuneResult:
    """Add a LoRA adapter to `model`, train it on `data` (Alpaca JSON or plain text) and save it to `out`."""
    from llamaforge.core.data import BlockLoader, read_documents, split_documents, tokenize_documents
    from llamaforge.core.train import evaluate as evaluate_tokens

    config = config or FinetuneConfig()
    fmt = detect_format(data) if data_format == "auto" else data_format
    max_positions = getattr(getattr(model, "spec", None), "max_positions", config.seq_len)
    seq_len = min(config.seq_len, max_positions)
    if fmt == "alpaca":
        records = read_instructions(data)
        order = list(range(len(records)))
        random.Random(config.seed).shuffle(order)
        n_val = max(1, int(len(records) * val_fraction)) if val_fraction > 0 else 0
        val_records = [records[i] for i in order[:n_val]]
        train_records = [records[i] for i in order[n_val:]]
        train_examples = instruction_examples(train_records, tokenizer, max_len=seq_len, template=template)
        val_examples = (
            instruction_examples(val_records, tokenizer, max_len=seq_len, template=template) if val_records else []
        )
        pad = _pad_id(tokenizer)
        batches = example_batches(train_examples, batch_size=config.batch_size, pad_id=pad, seed=config.seed)
        limit = val_examples[: config.eval_batches * config.batch_size]

        def evaluate(m: nn.Module) -> float:
            return evaluate_examples(m, limit, batch_size=config.batch_size, pad_id=pad)

        eval_fn = evaluate if val_examples else None
    elif fmt == "text":
        docs = list(read_documents(data))
        train_docs, val_docs = split_documents(docs, val_fraction, config.seed)
        if not train_docs:
            raise AdapterError(f"{data}: no training documents after the validation split")
        train_tokens = tokenize_documents(train_docs, tokenizer)
        val_tokens = tokenize_documents(val_docs, tokenizer) if val_docs else None
        loader = BlockLoader(train_tokens, batch_size=config.batch_size, seq_len=seq_len, seed=config.seed)
        batches = iter(loader)

        def evaluate(m: nn.Module) -> float:
            assert val_tokens is not None
            return evaluate_tokens(
                m, val_tokens, batch_size=config.batch_size, seq_len=seq_len, max_batches=config.eval_batches
            )["loss"]

        eval_fn = evaluate if val_tokens is not None and val_tokens.numel() > seq_len else None
    else:
        raise AdapterError(f"unknown data format {fmt!r}; use alpaca or text")
    add_adapter(
        model,
        "lora",
        name=name,
        rank=rank,
        alpha=alpha,
        dropout=dropout,
        targets=targets,
        rslora=rslora,
        seed=config.seed,
    )
    result = finetune(model, batches, config, adapter=name, evaluate=eval_fn, progress=progress)
    if out is not None:
        save_adapter(
            model,
            out,
            name,
            extra={
                "training": {
                    "data": str(data),
                    "format": fmt,
                    **{k: v for k, v in result.to_dict().items() if k != "history"},
                }
            },
        )
        from llamaforge.core.io import atomic_write_text

        atomic_write_text(Path(out) / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in result.history))
    return result
