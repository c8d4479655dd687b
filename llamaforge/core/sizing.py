"""Parameter counts and weight-memory estimates computed on the meta device (no memory allocated).

Counting the built module rather than a formula keeps the numbers right for any plugin a spec uses.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from llamaforge.core.model import build_model
from llamaforge.core.spec import ModelSpec, load_spec

NF4_BLOCK = 64


def weight_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of weights at fp32, bf16, int8 and nf4.

    int8: linear and embedding weights at 1 byte plus one fp32 scale per output row; other tensors bf16.
    nf4: linear weights at 4 bits plus one fp32 absmax per 64-value block (bitsandbytes without double
    quantization); embeddings, norms and the rest bf16.
    """
    seen: set[int] = set()
    total = linear = linear_rows = embed = embed_rows = 0
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            n = p.numel()
            total += n
            if name == "weight" and p.dim() == 2 and isinstance(module, nn.Embedding):
                embed += n
                embed_rows += p.shape[0]
            elif name == "weight" and p.dim() == 2:
                linear += n
                linear_rows += p.shape[0]
    other = total - linear - embed
    return {
        "fp32": total * 4,
        "bf16": total * 2,
        "int8": (linear + embed) + (linear_rows + embed_rows) * 4 + other * 2,
        "nf4": linear // 2 + (linear // NF4_BLOCK) * 4 + (embed + other) * 2,
    }


def spec_summary(source: str | Path | ModelSpec) -> dict[str, Any]:
    spec = load_spec(source)
    model = build_model(spec, device="meta")
    return {
        "spec": spec.to_dict(),
        "derived": {"head_dim": spec.head_size, "n_kv_heads": spec.kv_heads, "ffn_hidden": spec.ffn_hidden_size},
        "params": model.num_parameters(),
        "weight_bytes": weight_bytes(model),
    }
