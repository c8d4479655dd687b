"""Meta's original Llama 3 format: params.json + consolidated.NN.pth, interleaved RoPE, model-parallel shards.

Checkpoints are written by the test itself (random weights under Meta's names, sliced per rank the way Meta's
model-parallel layers slice them) and checked against a transcription of Meta's reference forward pass (complex
RoPE on interleaved pairs), against transformers after an `hf` export of the imported model, and through
llamaforge's own `meta` exporter and back.
"""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llamaforge import ModelFileError, SpecError, build_model, load_model, load_spec
from llamaforge.registry import registries

# ----- the test's own writer -------------------------------------------------------------------------------------

COLUMN = ("tok_embeddings", "output", "wq", "wk", "wv", "w1", "w3")  # sliced along rows per rank
ROW = ("wo", "w2")  # sliced along columns


def ffn_width(dim, multiple_of, multiplier):
    hidden = int(2 * 4 * dim / 3)
    if multiplier is not None:
        hidden = int(multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def random_meta_state(params, *, tied=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    dim, n_heads = params["dim"], params["n_heads"]
    kv = params.get("n_kv_heads", n_heads) * (dim // n_heads)
    hidden = ffn_width(dim, params["multiple_of"], params.get("ffn_dim_multiplier"))
    V = params["vocab_size"]

    def w(*shape, std=None):
        return torch.randn(*shape, generator=g) * (std if std is not None else 1.2 / math.sqrt(shape[-1]))

    state = {"tok_embeddings.weight": w(V, dim, std=1.0), "norm.weight": 1 + 0.1 * w(dim, std=1.0)}
    for i in range(params["n_layers"]):
        p = f"layers.{i}."
        state |= {
            p + "attention.wq.weight": w(dim, dim),
            p + "attention.wk.weight": w(kv, dim),
            p + "attention.wv.weight": w(kv, dim),
            p + "attention.wo.weight": w(dim, dim),
            p + "feed_forward.w1.weight": w(hidden, dim),
            p + "feed_forward.w2.weight": w(dim, hidden),
            p + "feed_forward.w3.weight": w(hidden, dim),
            p + "attention_norm.weight": 1 + 0.1 * w(dim, std=1.0),
            p + "ffn_norm.weight": 1 + 0.1 * w(dim, std=1.0),
        }
    state["output.weight"] = state["tok_embeddings.weight"].clone() if tied else w(V, dim)
    return state


def write_meta_dir(path, params, state, n_ranks):
    path.mkdir(parents=True, exist_ok=True)
    (path / "params.json").write_text(json.dumps(params))
    for rank in range(n_ranks):
        shard = {}
        for key, t in state.items():
            kind = key.split(".")[-2]
            if kind in COLUMN:
                shard[key] = t.chunk(n_ranks, 0)[rank].clone()
            elif kind in ROW:
                shard[key] = t.chunk(n_ranks, 1)[rank].clone()
            else:
                shard[key] = t.clone()
        torch.save(shard, path / f"consolidated.{rank:02d}.pth")


def read_meta_dir(path):
    files = sorted(path.glob("consolidated.*.pth"))
    shards = [torch.load(f, weights_only=True) for f in files]
    out = {}
    for key in shards[0]:
        kind = key.split(".")[-2]
        if kind in COLUMN:
            out[key] = torch.cat([s[key] for s in shards], 0)
        elif kind in ROW:
            out[key] = torch.cat([s[key] for s in shards], 1)
        else:
            out[key] = shards[0][key]
    return out, len(files)


# ----- a transcription of Meta's reference forward ---------------------------------------------------------------


def meta_reference_logits(params, state, tokens):
    dim, n_heads = params["dim"], params["n_heads"]
    n_kv = params.get("n_kv_heads", n_heads)
    hd = dim // n_heads
    eps, theta = params["norm_eps"], params["rope_theta"]
    freqs = 1.0 / (theta ** (torch.arange(0, hd, 2)[: hd // 2].float() / hd))
    if params.get("use_scaled_rope"):
        factor, low, high = params.get("rope_scaling_factor", 8.0), 1.0, params.get("rope_high_freq_factor", 4.0)
        old = params.get("rope_original_max_positions", 8192)
        new = []
        for f in freqs.tolist():
            wavelen = 2 * math.pi / f
            if wavelen < old / high:
                new.append(f)
            elif wavelen > old / low:
                new.append(f / factor)
            else:
                smooth = (old / wavelen - low) / (high - low)
                new.append((1 - smooth) * f / factor + smooth * f)
        freqs = torch.tensor(new, dtype=torch.float32)
    T = tokens.shape[1]
    freqs_cis = torch.polar(torch.ones(T, hd // 2), torch.outer(torch.arange(T).float(), freqs))

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    def rope(x):  # (B, T, H, hd), pairs (2i, 2i+1) as complex numbers
        xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(xc * freqs_cis[None, :, None, :]).flatten(3)

    h = state["tok_embeddings.weight"][tokens]
    mask = torch.full((T, T), float("-inf")).triu(1)
    for i in range(params["n_layers"]):
        p = f"layers.{i}."
        x = rms(h, state[p + "attention_norm.weight"])
        B = x.shape[0]
        q = (x @ state[p + "attention.wq.weight"].T).view(B, T, n_heads, hd)
        k = (x @ state[p + "attention.wk.weight"].T).view(B, T, n_kv, hd)
        v = (x @ state[p + "attention.wv.weight"].T).view(B, T, n_kv, hd)
        q, k = rope(q), rope(k)
        k = k.repeat_interleave(n_heads // n_kv, dim=2)
        v = v.repeat_interleave(n_heads // n_kv, dim=2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        scores = q @ k.transpose(2, 3) / math.sqrt(hd) + mask
        out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, dim)
        h = h + out @ state[p + "attention.wo.weight"].T
        x = rms(h, state[p + "ffn_norm.weight"])
        ff = torch.nn.functional.silu(x @ state[p + "feed_forward.w1.weight"].T) * (
            x @ state[p + "feed_forward.w3.weight"].T
        )
        h = h + ff @ state[p + "feed_forward.w2.weight"].T
    return rms(h, state["norm.weight"]) @ state["output.weight"].T


@st.composite
def meta_params(draw):
    heads, kv_heads = draw(st.sampled_from([(2, 1), (2, 2), (4, 2), (4, 4)]))
    hd = draw(st.sampled_from([4, 8]))
    params = {
        "dim": heads * hd,
        "n_layers": draw(st.integers(1, 2)),
        "n_heads": heads,
        "n_kv_heads": kv_heads,
        "vocab_size": 2 * draw(st.integers(8, 40)),
        "multiple_of": draw(st.sampled_from([2, 8, 32])),
        "ffn_dim_multiplier": draw(st.sampled_from([None, 1.3, 0.5])),
        "norm_eps": 1e-5,
        "rope_theta": draw(st.sampled_from([10000.0, 500000.0])),
        "use_scaled_rope": False,
        "max_seq_len": 64,
    }
    if draw(st.booleans()):
        params |= {"use_scaled_rope": True, "rope_scaling_factor": 8.0, "rope_original_max_positions": 16}
    return params


@settings(max_examples=6, deadline=None)
@given(meta_params(), st.sampled_from([1, 2]), st.booleans(), st.integers(2, 20))
def test_import_matches_meta_reference_forward(tmp_path_factory, params, ranks, tied, T):
    d = tmp_path_factory.mktemp("meta")
    state = random_meta_state(params, tied=tied)
    write_meta_dir(d, params, state, ranks)
    model = load_model(d)
    assert model.spec.tie_embeddings == tied
    assert model.spec.ffn_hidden_size == state["layers.0.feed_forward.w1.weight"].shape[0]
    tokens = torch.randint(0, params["vocab_size"], (2, T), generator=torch.Generator().manual_seed(T))
    with torch.no_grad():
        got = model(tokens).logits
    want = meta_reference_logits(params, state, tokens)
    torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)


def test_meta_and_hf_routes_agree(tmp_path):
    """The same weights imported from Meta's format, exported to HF and run by transformers give the same logits."""
    transformers = pytest.importorskip("transformers")
    params = {
        "dim": 64,
        "n_layers": 2,
        "n_heads": 4,
        "n_kv_heads": 2,
        "vocab_size": 96,
        "multiple_of": 32,
        "ffn_dim_multiplier": 1.3,
        "norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "use_scaled_rope": True,
        "rope_scaling_factor": 32.0,
        "rope_original_max_positions": 32,
        "max_seq_len": 256,
    }
    state = random_meta_state(params, seed=7)
    write_meta_dir(tmp_path / "meta", params, state, 2)
    ours = load_model(tmp_path / "meta")
    registries().exporter.get("hf")().export(ours, tmp_path / "hf")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tokens = torch.randint(0, 96, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = meta_reference_logits(params, state, tokens)
        torch.testing.assert_close(ours(tokens).logits, want, atol=2e-4, rtol=2e-4)
        torch.testing.assert_close(hf(tokens).logits, want, atol=2e-4, rtol=2e-4)
    # and back: the HF directory re-imported and written in Meta's format reproduces the original tensors
    registries().exporter.get("meta")().export(load_model(tmp_path / "hf"), tmp_path / "meta2", shards=2)
    again, n = read_meta_dir(tmp_path / "meta2")
    assert n == 2 and set(again) == set(state)
    for key, value in state.items():
        torch.testing.assert_close(again[key], value, atol=0, rtol=0)
    written = json.loads((tmp_path / "meta2" / "params.json").read_text())
    assert written["use_scaled_rope"] and written["rope_scaling_factor"] == 32.0


@pytest.mark.parametrize("spec_update", [{}, {"tie_embeddings": False, "ffn_hidden": 100}])
def test_llamaforge_meta_round_trip(tmp_path, spec_update):
    spec = load_spec("tiny").with_updates(n_layers=2, vocab_size=300, rope_theta=500000.0, **spec_update)
    model = build_model(spec, seed=0)
    out = registries().exporter.get("meta")().export(model, tmp_path, shards=2, dtype="bfloat16")
    assert sorted(p.name for p in out.iterdir()) == ["consolidated.00.pth", "consolidated.01.pth", "params.json"]
    again = load_model(tmp_path)
    assert again.spec.ffn_hidden_size == model.spec.ffn_hidden_size
    assert again.spec.tie_embeddings == model.spec.tie_embeddings
    assert again.dtype == torch.bfloat16
    ids = torch.randint(0, 300, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(again.float()(ids).logits, model.to(torch.bfloat16).float()(ids).logits)


def test_bad_meta_dirs_fail_clearly(tmp_path):
    params = {"dim": 16, "n_layers": 1, "n_heads": 2, "vocab_size": 20, "multiple_of": 8, "norm_eps": 1e-5,
              "rope_theta": 10000.0}  # fmt: skip
    state = random_meta_state(params)
    write_meta_dir(tmp_path, params, state, 1)
    (tmp_path / "params.json").write_text(json.dumps({**params, "multiple_of": 256}))
    with pytest.raises(ModelFileError, match="does not belong"):
        load_model(tmp_path)
    (tmp_path / "params.json").write_text(json.dumps({**params, "vocab_size": -1}))
    with pytest.raises(ModelFileError, match="vocab_size=-1"):
        load_model(tmp_path)
    (tmp_path / "params.json").write_text(json.dumps(params))
    torch.save({**state, "extra.weight": torch.zeros(1)}, tmp_path / "consolidated.00.pth")
    with pytest.raises(ModelFileError, match="not part of a Llama"):
        load_model(tmp_path)
    (tmp_path / "consolidated.00.pth").write_bytes(b"not a zip")
    with pytest.raises(ModelFileError, match="weights-only"):
        load_model(tmp_path)
    with pytest.raises(SpecError, match="norm=layernorm"):
        odd = build_model(load_spec("tiny").with_updates(norm="layernorm"))
        registries().exporter.get("meta")().export(odd, tmp_path)
