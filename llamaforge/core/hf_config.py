"""Translation between a ModelSpec and a Hugging Face Llama config.json.

Kept in core because both the `hf` importer and the `hf` exporter (and the run-directory loader) need the same
mapping, and because it is pure data: no component is named beyond what the spec already holds.
"""

from __future__ import annotations

from typing import Any

from llamaforge.core.spec import ComponentSpec, ModelSpec
from llamaforge.errors import ModelFileError

_ACT_TO_SLOT = {"silu": "swiglu", "swish": "swiglu", "gelu_pytorch_tanh": "geglu", "gelu_new": "geglu"}
_SLOT_TO_ACT = {"swiglu": "silu", "geglu": "gelu_pytorch_tanh"}


def _rope_from_config(cfg: dict[str, Any]) -> tuple[float, ComponentSpec | None]:
    """(theta, scaling) from either transformers 4.x (rope_theta + rope_scaling) or 5.x (rope_parameters)."""
    params = cfg.get("rope_parameters")
    scaling = cfg.get("rope_scaling")
    theta = cfg.get("rope_theta")
    if isinstance(params, dict):
        theta = params.get("rope_theta", theta)
        if scaling is None:
            scaling = params
    theta = float(theta if theta is not None else 10000.0)
    if not scaling:
        return theta, None
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type == "llama3":
        return theta, ComponentSpec(
            name="llama3",
            params={
                "factor": float(scaling["factor"]),
                "low_freq_factor": float(scaling.get("low_freq_factor", 1.0)),
                "high_freq_factor": float(scaling.get("high_freq_factor", 4.0)),
                "original_max_positions": int(scaling.get("original_max_position_embeddings", 8192)),
            },
        )
    if rope_type == "linear":
        return theta, ComponentSpec(name="linear", params={"factor": float(scaling["factor"])})
    raise ModelFileError(
        f"config.json uses rope type {rope_type!r}, which llamaforge cannot import (supported: default, llama3, linear)"
    )


def spec_from_hf_config(cfg: dict[str, Any]) -> ModelSpec:
    model_type = cfg.get("model_type", "llama")
    if model_type != "llama":
        raise ModelFileError(f"config.json has model_type {model_type!r}; only Llama-architecture models import")
    act = cfg.get("hidden_act", "silu")
    if act not in _ACT_TO_SLOT:
        raise ModelFileError(
            f"config.json hidden_act {act!r} has no llamaforge activation (known: {sorted(_ACT_TO_SLOT)})"
        )
    theta, scaling = _rope_from_config(cfg)
    dtype = cfg.get("dtype", cfg.get("torch_dtype")) or "float32"
    if dtype not in ("float32", "bfloat16", "float16"):
        dtype = "float32"
    try:
        n_heads = int(cfg["num_attention_heads"])
        dim = int(cfg["hidden_size"])
        data = {
            "name": cfg.get("_name_or_path") or None,
            "vocab_size": int(cfg["vocab_size"]),
            "dim": dim,
            "n_layers": int(cfg["num_hidden_layers"]),
            "n_heads": n_heads,
            "n_kv_heads": int(cfg.get("num_key_value_heads") or n_heads),
            "head_dim": int(cfg.get("head_dim") or dim // n_heads),
            "ffn_hidden": int(cfg["intermediate_size"]),
            "norm_eps": float(cfg.get("rms_norm_eps", 1e-6)),
            "rope_theta": theta,
            "rope_scaling": scaling,
            "max_positions": int(cfg.get("max_position_embeddings", 2048)),
            "tie_embeddings": bool(cfg.get("tie_word_embeddings", False)),
            "attention_bias": bool(cfg.get("attention_bias", False)),
            "mlp_bias": bool(cfg.get("mlp_bias", False)),
            "dropout": float(cfg.get("attention_dropout", 0.0) or 0.0),
            "init_std": float(cfg.get("initializer_range", 0.02)),
            "dtype": dtype,
            "bos_token_id": cfg.get("bos_token_id"),
            "eos_token_id": cfg.get("eos_token_id"),
            "pad_token_id": cfg.get("pad_token_id"),
            "activation": _ACT_TO_SLOT[act],
        }
    except KeyError as exc:
        raise ModelFileError(f"config.json lacks the required key {exc.args[0]!r}") from None
    return ModelSpec.parse(data, origin="spec derived from config.json")


PLAIN_LLAMA_SLOTS: tuple[tuple[str, str], ...] = (
    ("norm", "rmsnorm"),
    ("final_norm", "rmsnorm"),
    ("attention", "rope_attention"),
    ("position_embedding", "rope"),
    ("head", "linear"),
)


def slot_problems(
    spec: ModelSpec, slots: tuple[tuple[str, str], ...], *, needs: str = "needs", check_params: bool = False
) -> list[str]:
    """Slots whose component differs from what a fixed-architecture format can express (one line each)."""
    problems = []
    for slot, expected in slots:
        comp = getattr(spec, slot)
        if comp.name != expected or (check_params and comp.params):
            problems.append(f"{slot}={comp if check_params else comp.name} ({needs} {expected})")
    return problems


def hf_config_from_spec(spec: ModelSpec) -> dict[str, Any]:
    """A config.json that transformers 4.x and 5.x both read as LlamaForCausalLM."""
    from llamaforge.errors import SpecError

    problems = slot_problems(spec, PLAIN_LLAMA_SLOTS, needs="HF Llama needs")
    if spec.activation.name not in _SLOT_TO_ACT:
        problems.append(f"activation={spec.activation.name} (HF Llama needs swiglu or geglu)")
    if spec.layer_overrides:
        problems.append("layer_overrides (HF Llama layers are all alike)")
    if spec.n_layers == 0:
        problems.append("n_layers=0")
    if problems:
        raise SpecError("this model cannot be expressed as a Hugging Face Llama: " + "; ".join(problems))
    cfg: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": spec.vocab_size,
        "hidden_size": spec.dim,
        "num_hidden_layers": spec.n_layers,
        "num_attention_heads": spec.n_heads,
        "num_key_value_heads": spec.kv_heads,
        "head_dim": spec.head_size,
        "intermediate_size": spec.ffn_hidden_size,
        "hidden_act": _SLOT_TO_ACT[spec.activation.name],
        "rms_norm_eps": spec.norm_eps,
        "max_position_embeddings": spec.max_positions,
        "tie_word_embeddings": spec.tie_embeddings,
        "attention_bias": spec.attention_bias,
        "mlp_bias": spec.mlp_bias,
        "attention_dropout": spec.dropout,
        "initializer_range": spec.init_std,
        "pretraining_tp": 1,
        "use_cache": True,
        "torch_dtype": spec.dtype,
        "rope_theta": spec.rope_theta,
        "rope_scaling": None,
    }
    rope_parameters: dict[str, Any] = {"rope_type": "default", "rope_theta": spec.rope_theta}
    if spec.rope_scaling is not None and spec.rope_scaling.name != "default":
        p = spec.rope_scaling.params
        if spec.rope_scaling.name == "llama3":
            scaling = {
                "rope_type": "llama3",
                "factor": p["factor"],
                "low_freq_factor": p.get("low_freq_factor", 1.0),
                "high_freq_factor": p.get("high_freq_factor", 4.0),
                "original_max_position_embeddings": p.get("original_max_positions", 8192),
            }
        elif spec.rope_scaling.name == "linear":
            scaling = {"rope_type": "linear", "factor": p["factor"]}
        else:
            raise SpecError(f"rope_scaling {spec.rope_scaling.name!r} has no Hugging Face equivalent")
        cfg["rope_scaling"] = scaling
        rope_parameters = {**scaling, "rope_theta": spec.rope_theta}
    cfg["rope_parameters"] = rope_parameters
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(spec, key)
        if value is not None:
            cfg[key] = value
    return cfg
