"""Exporters: Hugging Face Llama directories that transformers loads with `from_pretrained`, llama2.c checkpoints
that its `run` executes, and Meta's original params.json + consolidated.NN.pth layout.

Each exporter rejects options it does not know, so a typo on the command line (`-o shards=2` given to `hf`) fails
instead of being silently ignored.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from llamaforge.core.hf_config import hf_config_from_spec
from llamaforge.core.interfaces import Exporter
from llamaforge.core.io import atomic_write_json, save_safetensors, unique_tensors
from llamaforge.errors import LlamaforgeError, SpecError
from llamaforge.registry import hookimpl

DEFAULT_SHARD_BYTES = 5 * 1024**3


class HFExporter(Exporter):
    """config.json, generation_config.json, model.safetensors (sharded with an index above `max_shard_bytes`)
    and the tokenizer files when a tokenizer is given."""

    def export(
        self,
        model: Any,
        out: Path,
        *,
        tokenizer: Any = None,
        max_shard_bytes: int = DEFAULT_SHARD_BYTES,
        dtype: str | None = None,
        **options: Any,
    ) -> Path:
        _reject_unknown("hf", options)
        max_shard_bytes = int(max_shard_bytes)
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        spec = model.spec
        config = hf_config_from_spec(spec)
        state = model.state_dict()
        if spec.tie_embeddings:
            state.pop("lm_head.weight", None)
        state = unique_tensors(state)
        if dtype is not None:
            from llamaforge.core.model import torch_dtype

            state = {k: v.to(torch_dtype(dtype)) if v.is_floating_point() else v for k, v in state.items()}
            config["torch_dtype"] = dtype
        else:
            config["torch_dtype"] = str(next(iter(state.values())).dtype).removeprefix("torch.")
        atomic_write_json(out / "config.json", config)
        gen = {"_from_model_config": True, "do_sample": False}
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if config.get(key) is not None:
                gen[key] = config[key]
        atomic_write_json(out / "generation_config.json", gen)
        _write_weights(out, state, max_shard_bytes)
        if tokenizer is not None:
            save_hf_tokenizer(tokenizer, out)
        return out


def _reject_unknown(fmt: str, options: dict[str, Any]) -> None:
    if options:
        raise SpecError(f"the {fmt!r} exporter has no option(s) {sorted(options)}; see `llamaforge export --help`")


def hf_tokenizer_of(tokenizer: Any) -> Any:
    """The transformers tokenizer behind any tokenizer llamaforge knows: a transformers tokenizer itself or a
    llamaforge Tokenizer (its `.hf`; a llama2.c tokenizer converts itself there)."""
    inner = getattr(tokenizer, "hf", None)
    if inner is not None and hasattr(inner, "save_pretrained"):
        return inner
    if hasattr(tokenizer, "save_pretrained"):
        return tokenizer
    raise LlamaforgeError(
        f"cannot write a {type(tokenizer).__name__} as Hugging Face tokenizer files; pass a transformers tokenizer"
    )


def save_hf_tokenizer(tokenizer: Any, out: Path) -> None:
    """Tokenizer files both transformers 4.x and 5.x load: 5.x writes tokenizer_class "TokenizersBackend", a class
    4.x lacks, while both resolve "PreTrainedTokenizerFast" for a tokenizer.json."""
    hf_tokenizer_of(tokenizer).save_pretrained(str(out))
    cfg_path = out / "tokenizer_config.json"
    if cfg_path.exists():
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        if cfg.get("tokenizer_class") == "TokenizersBackend" and (out / "tokenizer.json").exists():
            cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
            cfg.pop("backend", None)
            atomic_write_json(cfg_path, cfg)


class Llama2cExporter(Exporter):
    """A llama2.c checkpoint (`version` 1 by default, 0 for the legacy header) plus tokenizer.bin when the model's
    tokenizer is a llama2.c one. `out` is a .bin file path or a directory (then model.bin inside)."""

    def export(self, model: Any, out: Path, *, tokenizer: Any = None, version: int = 1, **options: Any) -> Path:
        from llamaforge.core.llama2c import Llama2cTokenizer, save_llama2c

        _reject_unknown("llama2c", options)
        out = Path(out)
        target = out if out.suffix == ".bin" else out / "model.bin"
        save_llama2c(model, target, version=int(version))
        if isinstance(tokenizer, Llama2cTokenizer):
            tokenizer.save_bin(target.parent / "tokenizer.bin")
        return target


class MetaExporter(Exporter):
    """params.json + consolidated.NN.pth (`shards` model-parallel ranks), as Meta's reference code loads them."""

    def export(
        self, model: Any, out: Path, *, tokenizer: Any = None, shards: int = 1, dtype: str | None = None, **options: Any
    ) -> Path:
        from llamaforge.core.meta_format import save_meta

        _reject_unknown("meta", options)
        out = save_meta(model, out, shards=int(shards), dtype=dtype)
        save = getattr(tokenizer, "save", None)
        if callable(save):
            save(out)
        return out


def _write_weights(out: Path, state: dict[str, torch.Tensor], max_shard_bytes: int) -> None:
    for stale in [*list(out.glob("model-*-of-*.safetensors")), out / "model.safetensors.index.json"]:
        stale.unlink(missing_ok=True)
    total = sum(t.numel() * t.element_size() for t in state.values())
    if total <= max_shard_bytes:
        save_safetensors(out / "model.safetensors", state, metadata={"format": "pt"})
        return
    (out / "model.safetensors").unlink(missing_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_safetensors(out / fname, shard, metadata={"format": "pt"})
        weight_map.update({name: fname for name in shard})
    atomic_write_json(
        out / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map}
    )


def export_hf(model: Any, out: str | Path, **options: Any) -> Path:
    return HFExporter().export(model, Path(out), **options)


@hookimpl
def llamaforge_register(register):
    register("exporter", "hf", HFExporter)
    register("exporter", "llama2c", Llama2cExporter)
    register("exporter", "meta", MetaExporter)


__all__ = ["HFExporter", "Llama2cExporter", "MetaExporter", "export_hf", "hf_tokenizer_of", "save_hf_tokenizer"]
