"""Meta's original Llama 3 checkpoint format: params.json + consolidated.NN.pth.

Meta's reference model applies RoPE to interleaved pairs (2i, 2i+1) of each head, while llamaforge (like Hugging
Face) rotates the two halves of a head (`rotate_half`). The weights are the same function once the rows of wq and
wk are permuted within each head, so import and export are a rename plus that permutation; wv, wo and the feed
forward need none. llama2.c uses the same names and layout, so its reader and writer reuse the helpers here.

Checkpoints larger than one GPU come as several consolidated.NN.pth files, one per model-parallel rank, each holding
a slice of every parallel weight: column-parallel ones (wq, wk, wv, w1, w3, output, and the vocab-parallel
embedding) are split along rows, row-parallel ones (wo, w2) along columns, and norms are replicated.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from llamaforge.core.spec import ComponentSpec, ModelSpec
from llamaforge.errors import ModelFileError, SpecError

PARAMS_FILE = "params.json"
_SHARD_RE = re.compile(r"consolidated\.(\d+)\.pth$")

# Meta name -> llamaforge (= Hugging Face) name; {i} is the layer index.
_LAYER_NAMES = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_TOP_NAMES = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
# dimension along which model-parallel ranks split each weight (None: replicated)
_SPLIT_DIM = {
    "tok_embeddings.weight": 0,
    "output.weight": 0,
    "norm.weight": None,
    "attention.wq.weight": 0,
    "attention.wk.weight": 0,
    "attention.wv.weight": 0,
    "attention.wo.weight": 1,
    "feed_forward.w1.weight": 0,
    "feed_forward.w3.weight": 0,
    "feed_forward.w2.weight": 1,
    "attention_norm.weight": None,
    "ffn_norm.weight": None,
}
# Meta's Llama 3.1 RoPE scaling constants, used when params.json only says use_scaled_rope
_META_LOW_FREQ, _META_HIGH_FREQ, _META_ORIGINAL, _META_FACTOR = 1.0, 4.0, 8192, 8.0


def interleaved_to_half(w: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """Rows (2i, 2i+1) of each head become rows (i, i + head_dim/2): interleaved RoPE -> rotate_half RoPE."""
    rest = w.shape[1:]
    return w.reshape(n_heads, head_dim // 2, 2, *rest).transpose(1, 2).reshape(n_heads * head_dim, *rest)


def half_to_interleaved(w: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """The inverse of `interleaved_to_half`."""
    rest = w.shape[1:]
    return w.reshape(n_heads, 2, head_dim // 2, *rest).transpose(1, 2).reshape(n_heads * head_dim, *rest)


def _split_key(key: str) -> tuple[int | None, str]:
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", key)
    return (int(m.group(1)), m.group(2)) if m else (None, key)


def meta_to_hf_state(state: dict[str, torch.Tensor], spec: ModelSpec) -> dict[str, torch.Tensor]:
    """Meta-named, interleaved-RoPE weights -> llamaforge names and layout (q/k permuted)."""
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, tensor in state.items():
        layer, rest = _split_key(key)
        if layer is None:
            if key in _TOP_NAMES:
                out[_TOP_NAMES[key]] = tensor
            elif key == "output.weight":
                if not spec.tie_embeddings:
                    out["lm_head.weight"] = tensor
            elif key == "rope.freqs" or key.startswith("freq_cis"):
                continue  # precomputed RoPE tables; llamaforge computes its own
            else:
                unknown.append(key)
            continue
        if rest not in _LAYER_NAMES:
            unknown.append(key)
            continue
        if rest == "attention.wq.weight":
            tensor = interleaved_to_half(tensor, spec.n_heads, spec.head_size)
        elif rest == "attention.wk.weight":
            tensor = interleaved_to_half(tensor, spec.kv_heads, spec.head_size)
        out[f"model.layers.{layer}.{_LAYER_NAMES[rest]}"] = tensor
    if unknown:
        raise ModelFileError(
            f"checkpoint has {len(unknown)} tensors that are not part of a Llama model (e.g. {unknown[:3]}); "
            f"is it a Llama checkpoint in Meta's format?"
        )
    return out


def hf_to_meta_state(state: dict[str, torch.Tensor], spec: ModelSpec) -> dict[str, torch.Tensor]:
    """llamaforge weights -> Meta names with interleaved q/k rows (output.weight always written)."""
    inverse_layer = {v: k for k, v in _LAYER_NAMES.items()}
    inverse_top = {v: k for k, v in _TOP_NAMES.items()}
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if key in inverse_top:
            out[inverse_top[key]] = tensor
            continue
        if key == "lm_head.weight":
            out["output.weight"] = tensor
            continue
        m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", key)
        if not m or m.group(2) not in inverse_layer:
            raise SpecError(f"tensor {key} has no place in Meta's Llama format")
        name = inverse_layer[m.group(2)]
        if name == "attention.wq.weight":
            tensor = half_to_interleaved(tensor, spec.n_heads, spec.head_size)
        elif name == "attention.wk.weight":
            tensor = half_to_interleaved(tensor, spec.kv_heads, spec.head_size)
        out[f"layers.{m.group(1)}.{name}"] = tensor.contiguous()
    if "output.weight" not in out:
        out["output.weight"] = out["tok_embeddings.weight"]
    return out


def check_meta_expressible(spec: ModelSpec) -> None:
    """Meta's reference model is a plain Llama; anything else must fail before a file is written."""
    from llamaforge.core.hf_config import PLAIN_LLAMA_SLOTS, slot_problems

    problems = slot_problems(spec, (*PLAIN_LLAMA_SLOTS, ("activation", "swiglu")), check_params=True)
    if spec.layer_overrides:
        problems.append("layer_overrides")
    if spec.attention_bias or spec.mlp_bias:
        problems.append("biases")
    if spec.head_size * spec.n_heads != spec.dim:
        problems.append(f"head_dim={spec.head_size} with n_heads * head_dim != dim ({spec.dim})")
    if spec.rope_scaling is not None and spec.rope_scaling.name not in ("llama3", "default"):
        problems.append(f"rope_scaling={spec.rope_scaling.name} (Meta's format has only Llama 3.1 scaling)")
    if problems:
        raise SpecError("this model cannot be written in Meta's Llama format: " + "; ".join(problems))


# ----- params.json -----------------------------------------------------------------------------------------------


def _ffn_rule(dim: int, multiple_of: int, multiplier: float | None) -> int:
    hidden = int(2 * (4 * dim) / 3)
    if multiplier is not None:
        hidden = int(multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def params_from_spec(spec: ModelSpec) -> dict[str, Any]:
    """params.json for `spec`; keys Meta's ModelArgs does not know are read back by llamaforge and ignored by Meta."""
    check_meta_expressible(spec)
    hidden = spec.ffn_hidden_size
    multiple_of, multiplier = spec.multiple_of, spec.ffn_dim_multiplier
    if _ffn_rule(spec.dim, multiple_of, multiplier) != hidden:
        # an explicit ffn_hidden: pick multiple_of/multiplier that Meta's rule maps to it
        base = int(2 * (4 * spec.dim) / 3)
        multiple_of, multiplier = 1, (hidden + 0.5) / base
        if _ffn_rule(spec.dim, multiple_of, multiplier) != hidden:
            raise SpecError(f"ffn_hidden={hidden} cannot be expressed with Meta's multiple_of/ffn_dim_multiplier")
    params: dict[str, Any] = {
        "dim": spec.dim,
        "n_layers": spec.n_layers,
        "n_heads": spec.n_heads,
        "n_kv_heads": spec.kv_heads,
        "vocab_size": spec.vocab_size,
        "multiple_of": multiple_of,
        "ffn_dim_multiplier": multiplier,
        "norm_eps": spec.norm_eps,
        "rope_theta": spec.rope_theta,
        "use_scaled_rope": False,
        "max_seq_len": spec.max_positions,
    }
    if spec.rope_scaling is not None and spec.rope_scaling.name == "llama3":
        p = spec.rope_scaling.params
        params["use_scaled_rope"] = True
        params["rope_scaling_factor"] = float(p["factor"])
        params["rope_high_freq_factor"] = float(p.get("high_freq_factor", _META_HIGH_FREQ))
        # Meta hard-codes these two; written only when they differ so the file stays Meta-readable
        if float(p.get("low_freq_factor", _META_LOW_FREQ)) != _META_LOW_FREQ:
            params["rope_low_freq_factor"] = float(p["low_freq_factor"])
        if int(p.get("original_max_positions", _META_ORIGINAL)) != _META_ORIGINAL:
            params["rope_original_max_positions"] = int(p["original_max_positions"])
    extras = {k: getattr(spec, k) for k in ("bos_token_id", "eos_token_id") if getattr(spec, k) is not None}
    if spec.tie_embeddings:
        extras["tie_embeddings"] = True
    if extras:
        params["llamaforge"] = extras
    return params


def spec_from_params(params: dict[str, Any], *, tie_embeddings: bool = False, name: str | None = None) -> ModelSpec:
    try:
        dim, n_heads = int(params["dim"]), int(params["n_heads"])
        vocab = int(params["vocab_size"])
        data: dict[str, Any] = {
            "name": name,
            "vocab_size": vocab,
            "dim": dim,
            "n_layers": int(params["n_layers"]),
            "n_heads": n_heads,
            "n_kv_heads": int(params.get("n_kv_heads") or n_heads),
            "multiple_of": int(params.get("multiple_of", 256)),
            "ffn_dim_multiplier": params.get("ffn_dim_multiplier"),
            "norm_eps": float(params.get("norm_eps", 1e-5)),
            "rope_theta": float(params.get("rope_theta", 10000.0)),
            "max_positions": int(params.get("max_seq_len") or 8192),
            "tie_embeddings": tie_embeddings,
        }
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelFileError(f"{PARAMS_FILE} lacks or mangles a required field: {exc}") from None
    if vocab <= 0:
        raise ModelFileError(
            f"{PARAMS_FILE} has vocab_size={vocab} (Llama 1/2 left it to the tokenizer); set it to the tokenizer size"
        )
    if params.get("use_scaled_rope"):
        factor = float(params.get("rope_scaling_factor") or _META_FACTOR)
        data["rope_scaling"] = ComponentSpec(
            name="llama3",
            params={
                "factor": factor,
                "low_freq_factor": float(params.get("rope_low_freq_factor", _META_LOW_FREQ)),
                "high_freq_factor": float(params.get("rope_high_freq_factor") or _META_HIGH_FREQ),
                "original_max_positions": int(params.get("rope_original_max_positions", _META_ORIGINAL)),
            },
        )
        if data["max_positions"] < data["rope_scaling"].params["original_max_positions"]:
            data["max_positions"] = int(data["rope_scaling"].params["original_max_positions"] * factor)
    extras = params.get("llamaforge") or {}
    for key in ("bos_token_id", "eos_token_id"):
        if key in extras:
            data[key] = extras[key]
    return ModelSpec.parse(data, origin=f"spec derived from {PARAMS_FILE}")


# ----- reading and writing directories ----------------------------------------------------------------------------


def shard_files(path: Path) -> list[Path]:
    """consolidated.NN.pth files in rank order."""
    found = []
    for p in Path(path).glob("consolidated.*.pth"):
        m = _SHARD_RE.search(p.name)
        if m:
            found.append((int(m.group(1)), p))
    found.sort()
    ranks = [r for r, _ in found]
    if ranks != list(range(len(ranks))):
        raise ModelFileError(f"{path}: consolidated shards are not numbered 00..{len(ranks) - 1:02d} (found {ranks})")
    return [p for _, p in found]


def is_meta_dir(path: Path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / PARAMS_FILE).exists() and any(path.glob("consolidated.*.pth"))


def read_params(path: Path) -> dict[str, Any]:
    try:
        return json.loads((Path(path) / PARAMS_FILE).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ModelFileError(f"{Path(path) / PARAMS_FILE} is not valid JSON: {exc}") from None


def _load_shard(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # pickle errors, truncated zip files, disallowed globals
        raise ModelFileError(f"cannot read {path} as a weights-only torch checkpoint: {exc}") from None
    if not isinstance(state, dict):
        raise ModelFileError(f"{path} holds a {type(state).__name__}, not a state dict")
    return state


def merge_shards(shards: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Concatenate model-parallel slices back into whole tensors."""
    if len(shards) == 1:
        return dict(shards[0])
    merged: dict[str, torch.Tensor] = {}
    for key in shards[0]:
        _, rest = _split_key(key)
        if rest not in _SPLIT_DIM:
            merged[key] = shards[0][key]  # unknown tensors are reported by meta_to_hf_state
            continue
        dim = _SPLIT_DIM[rest]
        try:
            parts = [s[key] for s in shards]
        except KeyError:
            raise ModelFileError(f"tensor {key} is missing from some consolidated shards") from None
        merged[key] = parts[0] if dim is None else torch.cat(parts, dim=dim)
    return merged


def split_state(state: dict[str, torch.Tensor], n: int) -> list[dict[str, torch.Tensor]]:
    """Slice whole tensors into `n` model-parallel shards (the inverse of `merge_shards`)."""
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(n)]
    for key, tensor in state.items():
        _, rest = _split_key(key)
        dim = _SPLIT_DIM.get(rest)
        if dim is None:
            for s in shards:
                s[key] = tensor.clone()
            continue
        if tensor.shape[dim] % n:
            raise SpecError(f"{key} (shape {tuple(tensor.shape)}) cannot be split into {n} model-parallel shards")
        for s, part in zip(shards, tensor.chunk(n, dim=dim)):
            s[key] = part.clone()
    return shards


def load_meta(path: str | Path) -> tuple[ModelSpec, dict[str, torch.Tensor]]:
    """(spec, llamaforge-named state) from a Meta checkpoint directory."""
    path = Path(path)
    params = read_params(path)
    files = shard_files(path)
    if not files:
        raise ModelFileError(f"{path} has {PARAMS_FILE} but no consolidated.NN.pth weights")
    state = merge_shards([_load_shard(f) for f in files])
    if "tok_embeddings.weight" not in state:
        raise ModelFileError(f"{files[0]} has no tok_embeddings.weight; not a Llama checkpoint in Meta's format")
    spec = spec_for_state(params, state, name=path.name)
    return spec, meta_to_hf_state(state, spec)


def spec_for_state(params: dict[str, Any], state: dict[str, torch.Tensor], *, name: str | None = None) -> ModelSpec:
    """The spec from params.json, with tying decided by the weights (Llama 3.2 1B/3B store output = embedding)."""
    out = state.get("output.weight")
    tied = bool((params.get("llamaforge") or {}).get("tie_embeddings")) or out is None
    if out is not None and not tied:
        emb = state["tok_embeddings.weight"]
        tied = out.shape == emb.shape and torch.equal(out, emb)
    spec = spec_from_params(params, tie_embeddings=tied, name=name)
    w1 = next((t for k, t in state.items() if k.endswith("feed_forward.w1.weight")), None)
    if w1 is not None and w1.shape[0] != spec.ffn_hidden_size:
        raise ModelFileError(
            f"{PARAMS_FILE} gives a feed-forward width of {spec.ffn_hidden_size} (multiple_of, ffn_dim_multiplier) "
            f"but the weights have {w1.shape[0]}; the params.json does not belong to these weights"
        )
    return spec


def save_meta(
    model: Any,
    out: str | Path,
    *,
    shards: int = 1,
    dtype: torch.dtype | str | None = None,
) -> Path:
    """Write params.json + consolidated.NN.pth (`shards` model-parallel ranks) for a plain Llama model."""
    from llamaforge.core.io import _atomic, atomic_write_json
    from llamaforge.core.model import torch_dtype

    spec: ModelSpec = model.spec
    params = params_from_spec(spec)
    for key, n in (("n_heads", spec.n_heads), ("n_kv_heads", spec.kv_heads)):
        if n % shards:
            raise SpecError(f"{shards} model-parallel shards must divide {key}={n}")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if dtype is not None:
        target = torch_dtype(dtype)
        state = {k: v.to(target) if v.is_floating_point() else v for k, v in state.items()}
    meta = hf_to_meta_state(state, spec)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("consolidated.*.pth"):
        stale.unlink()
    for rank, shard in enumerate(split_state(meta, shards)):
        _atomic(out / f"consolidated.{rank:02d}.pth", lambda p, s=shard: torch.save(s, p))
    atomic_write_json(out / PARAMS_FILE, params)
    return out
