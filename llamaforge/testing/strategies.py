"""Hypothesis strategies for valid model specs."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

from llamaforge.core.spec import ModelSpec


@st.composite
def specs(
    draw: Any,
    *,
    max_layers: int = 2,
    max_heads: int = 4,
    vocab_sizes: tuple[int, int] = (16, 96),
    activations: tuple[str, ...] = ("swiglu", "gelu", "relu", "geglu"),
    norms: tuple[str, ...] = ("rmsnorm", "layernorm"),
    kernels: tuple[str, ...] = ("sdpa", "eager"),
    rope_scaling: bool = True,
    **fixed: Any,
) -> ModelSpec:
    """Small valid specs: any head/kv-head split, tied or not, default or llama3 RoPE; `fixed` pins fields."""
    n_heads = draw(st.integers(1, max_heads))
    n_kv = draw(st.sampled_from([d for d in range(1, n_heads + 1) if n_heads % d == 0]))
    head_dim = draw(st.sampled_from([4, 8, 16]))
    data: dict[str, Any] = {
        "vocab_size": draw(st.integers(*vocab_sizes)),
        "dim": n_heads * head_dim * draw(st.sampled_from([1, 2])),
        "n_layers": draw(st.integers(1, max_layers)),
        "n_heads": n_heads,
        "n_kv_heads": n_kv,
        "head_dim": head_dim,
        "ffn_hidden": draw(st.integers(8, 64)),
        "max_positions": 64,
        "rope_theta": draw(st.sampled_from([10000.0, 500000.0])),
        "tie_embeddings": draw(st.booleans()),
        "norm": draw(st.sampled_from(norms)),
        "activation": draw(st.sampled_from(activations)),
        "attention_kernel": draw(st.sampled_from(kernels)),
    }
    if rope_scaling and draw(st.booleans()):
        data["rope_scaling"] = {
            "name": "llama3",
            "params": {"factor": draw(st.sampled_from([2.0, 8.0])), "original_max_positions": 32},
        }
    data.update(fixed)
    return ModelSpec.parse(data)
