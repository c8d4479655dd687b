"""Parity with transformers' LlamaForCausalLM, loading through a saved Hugging Face directory."""

from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llamaforge import ModelFileError, load_model
from llamaforge.plugins.exporters import export_hf

transformers = pytest.importorskip("transformers")


@st.composite
def hf_configs(draw):
    heads = draw(st.sampled_from([1, 2, 4, 8]))
    kv = draw(st.sampled_from([d for d in (1, 2, 4, 8) if heads % d == 0]))
    head_dim = draw(st.sampled_from([8, 16]))
    scaling = None
    if draw(st.booleans()):
        scaling = {
            "rope_type": "llama3",
            "factor": draw(st.sampled_from([2.0, 8.0, 32.0])),
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        }
    return transformers.LlamaConfig(
        vocab_size=draw(st.integers(32, 200)),
        hidden_size=heads * head_dim * draw(st.sampled_from([1, 2])),
        head_dim=head_dim,
        intermediate_size=draw(st.integers(16, 96)),
        num_hidden_layers=draw(st.integers(1, 3)),
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=128,
        tie_word_embeddings=draw(st.booleans()),
        rope_theta=draw(st.sampled_from([10000.0, 500000.0])),
        rope_scaling=scaling,
        rms_norm_eps=1e-5,
    )


def _hf_model(cfg, seed=0):
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # HF initialises norms to one; randomise so norm weights are exercised too
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.1)
    return model


@settings(max_examples=12, deadline=None)
@given(hf_configs(), st.integers(1, 40))
def test_hf_to_llamaforge_logits_match(cfg, seq):
    hf = _hf_model(cfg)
    with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf.save_pretrained(d)
        ours = load_model(d)
        assert ours.spec.tie_embeddings == cfg.tie_word_embeddings
        ids = torch.randint(0, cfg.vocab_size, (2, seq))
        with torch.no_grad():
            ref = hf(ids).logits
            got = ours(ids).logits
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


@settings(max_examples=6, deadline=None)
@given(hf_configs())
def test_llamaforge_to_hf_roundtrip(cfg):
    hf = _hf_model(cfg, seed=1)
    with tempfile.TemporaryDirectory() as d, tempfile.TemporaryDirectory() as d2, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf.save_pretrained(d)
        ours = load_model(d)
        export_hf(ours, d2)
        back = transformers.AutoModelForCausalLM.from_pretrained(d2).eval()
        ids = torch.randint(0, cfg.vocab_size, (1, 17))
        with torch.no_grad():
            torch.testing.assert_close(back(ids).logits, ours(ids).logits, atol=1e-4, rtol=1e-4)


def test_sharded_export_and_import(tmp_path):
    from llamaforge import build_model

    model = build_model("tiny", seed=0).eval()
    export_hf(model, tmp_path, max_shard_bytes=2_000_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    again = load_model(tmp_path)
    ids = torch.randint(0, 4096, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids).logits, atol=1e-4, rtol=1e-4)


def test_transformers_4x_style_config_reads(tmp_path):
    """A config written by transformers 4.x: rope_theta + rope_scaling with 'type', no rope_parameters."""
    from llamaforge import build_model, save_model

    model = build_model("tiny", seed=0)
    export_hf(model, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.pop("rope_parameters")
    cfg["rope_theta"] = 12345.0
    cfg["rope_scaling"] = {
        "type": "llama3",
        "factor": 4.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    spec = load_model(tmp_path).spec
    assert spec.rope_theta == 12345.0
    assert spec.rope_scaling.name == "llama3" and spec.rope_scaling.params["factor"] == 4.0
    save_model(build_model(spec), tmp_path / "ours")


def test_bad_model_dirs_fail_clearly(tmp_path):
    with pytest.raises(ModelFileError, match="does not exist"):
        load_model(tmp_path / "nope")
    with pytest.raises(ModelFileError, match="no importer"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ModelFileError, match="model_type 'gpt2'"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text("{broken")
    with pytest.raises(ModelFileError, match="not valid JSON"):
        load_model(tmp_path)


def test_mismatched_weights_fail_loudly(tmp_path):
    from llamaforge import build_model, save_model
    from llamaforge.core.io import save_safetensors

    model = build_model("tiny")
    save_model(model, tmp_path)
    state = model.state_dict()
    state.pop("model.layers.0.mlp.up_proj.weight")
    save_safetensors(Path(tmp_path) / "model.safetensors", state)
    with pytest.raises(ModelFileError, match="missing 1 tensors"):
        load_model(tmp_path)
