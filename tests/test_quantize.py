"""Quantizer plugins: error bounds, save/load, generation, patterns, errors, third-party quantizers, the CLI."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import llamaforge as lf
from llamaforge.cli import cli
from llamaforge.core.loading import TRANSFORMS_FILE, WEIGHTS_FILE, apply_transform, load_model, save_model
from llamaforge.errors import LlamaforgeError, UnknownComponentError
from llamaforge.plugins import quantizers as qz
from llamaforge.testing import check_component

METHODS = ["int8_dynamic", "int8_weight_only", "int8_embedding", "nf4"]
SMALL = dict(
    vocab_size=96, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=128, max_positions=64, rope_theta=1e4
)


def small_model(**overrides) -> lf.LlamaForgeModel:
    return lf.build_model({**SMALL, "tie_embeddings": True, **overrides}, seed=0).eval()


def ids(batch: int = 2, seq: int = 10, vocab: int = 96) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(1))


def rows(draw_shape, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*draw_shape, generator=g) * torch.rand(draw_shape[0], 1, generator=g) * 3


shapes = st.tuples(st.integers(1, 48), st.integers(1, 80))


# ----- error bounds -----------------------------------------------------------------------------------------------
@settings(max_examples=25)
@given(shape=shapes, seed=st.integers(0, 2**16), dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_int8_rows_error_is_at_most_half_a_step(shape, seed, dtype):
    w = rows(shape, seed).to(dtype)
    q, scale = qz.quantize_int8_rows(w)
    assert q.dtype == torch.int8 and scale.dtype == dtype and q.shape == w.shape
    err = (q.float() * scale.float()[:, None] - w.float()).abs()
    # half a quantization step (plus the rounding of the stored bf16 scale against a row maximum of 127 steps)
    slack = 0.0 if dtype == torch.float32 else 127 * 2**-8
    assert (err <= scale.float()[:, None] * (0.5 + slack) + 1e-6).all()


@settings(max_examples=25)
@given(out_in=shapes, tokens=st.integers(1, 9), seed=st.integers(0, 2**16), dynamic=st.booleans())
def test_int8_linear_output_error_bounded(out_in, tokens, seed, dynamic):
    out_f, in_f = out_in
    g = torch.Generator().manual_seed(seed)
    w, b = rows((out_f, in_f), seed), torch.randn(out_f, generator=g)
    x = torch.randn(tokens, in_f, generator=g) * 2
    mod = qz.Int8Linear.from_float(w, b, dynamic=dynamic)
    y, ref = mod(x), x @ w.T + b
    w_step = mod.weight_scale[None, :]
    # |x . dw| <= |x|_1 * w_step / 2; dynamic adds |dx . w| + |dx . dw| with dx <= x_step / 2 per element
    bound = x.abs().sum(-1, keepdim=True) * w_step / 2
    if dynamic:
        x_step = x.abs().amax(-1, keepdim=True) / 127
        bound = bound + x_step / 2 * (w.abs().sum(-1)[None, :] + in_f * w_step / 2)
    assert ((y - ref).abs() <= bound * 1.0001 + 1e-4).all()


@settings(max_examples=10)
@given(shape=shapes, seed=st.integers(0, 2**16), blocksize=st.sampled_from([64, 128]))
def test_nf4_error_bounded_by_half_the_widest_code_gap(shape, seed, blocksize):
    w = rows(shape, seed)
    mod = qz.NF4Linear.from_float(w, None, blocksize=blocksize)
    code = qz.nf4_code()
    half_gap = float(code.diff().max()) / 2
    flat_err = (mod.dequantize() - w).abs().reshape(-1)
    absmax = mod.weight_absmax.repeat_interleave(blocksize)[: w.numel()]
    assert (flat_err <= absmax * half_gap + 1e-6).all()
    if shape[1] % blocksize == 0:  # bitsandbytes' CPU decoder agrees only when rows hold whole blocks
        reference = qz._bnb().functional.dequantize_4bit(mod.weight, mod._state(torch.float32))
        assert torch.equal(mod.dequantize(), reference)
    x = torch.randn(3, shape[1])
    torch.testing.assert_close(mod(x), x @ mod.dequantize().T, atol=1e-4, rtol=1e-4)


@settings(max_examples=15)
@given(shape=st.tuples(st.integers(1, 40), st.integers(1, 150)), seed=st.integers(0, 2**16))
def test_embeddings_decode_what_was_stored(shape, seed):
    w = rows(shape, seed)
    lookup = torch.randint(0, shape[0], (2, 5))
    int8 = qz.Int8Embedding.from_float(w)
    err = (int8(lookup) - w[lookup]).abs()
    assert (err <= int8.weight_scale[lookup][..., None] / 2 + 1e-6).all()
    nf4 = qz.NF4Embedding.from_float(w, blocksize=64)  # rows padded to whole blocks when dim % 64 != 0
    full = nf4.dequantize()
    torch.testing.assert_close(nf4(lookup), full[lookup])
    padded = torch.nn.functional.pad(w, (0, nf4.padded_dim - shape[1]))
    packed, absmax = qz.nf4_quantize(padded, 64)  # the bitsandbytes decoding of the same bytes
    state = qz.nf4_state(absmax, tuple(padded.shape), 64, torch.float32)
    reference = qz._bnb().functional.dequantize_4bit(packed, state)[:, : shape[1]]
    torch.testing.assert_close(full, reference, atol=0, rtol=0)
    h = torch.randn(3, shape[1])
    torch.testing.assert_close(nf4.linear(h), h @ full.T, atol=1e-4, rtol=1e-4)


# ----- whole models -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_contract(method):
    check_component("quantizer", method)


@pytest.mark.parametrize("method", METHODS)
def test_save_load_round_trip_is_exact_and_smaller(method, tmp_path):
    base = small_model()
    save_model(base, tmp_path / "fp32")
    q = apply_transform(copy.deepcopy(base), "quantizer", method, exclude=["model.layers.1.mlp.*"])
    save_model(q, tmp_path / "q")
    records = json.loads((tmp_path / "q" / TRANSFORMS_FILE).read_text())
    assert records == [{"kind": "quantizer", "name": method, "params": {"exclude": ["model.layers.1.mlp.*"]}}]
    loaded = load_model(tmp_path / "q")
    assert qz.quantized_modules(loaded) == qz.quantized_modules(q)
    x = ids()
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, q(x).logits)
    assert (tmp_path / "q" / WEIGHTS_FILE).stat().st_size < (tmp_path / "fp32" / WEIGHTS_FILE).stat().st_size


@pytest.mark.parametrize("method", METHODS)
def test_quantized_models_generate_and_decode_like_a_full_forward(method):
    from llamaforge.core.generation import GenerationConfig, generate

    model = apply_transform(small_model(), "quantizer", method)
    prompt = [5, 17, 3, 42]
    out = generate(model, [prompt], GenerationConfig.from_options(greedy=True, max_new_tokens=6))[0]
    assert len(out) == 6 and all(0 <= t < SMALL["vocab_size"] for t in out)
    # the last cached decoding step scores the same as a forward over the whole sequence
    seq = torch.tensor([prompt + out[:-1]])
    with torch.no_grad():
        full = model(seq).logits[:, -1]
        cache = model.new_cache(1, seq.size(1))
        model(seq[:, :-1], cache=cache, cache_position=torch.arange(seq.size(1) - 1))
        step = model(seq[:, -1:], cache=cache, cache_position=torch.tensor([seq.size(1) - 1])).logits[:, -1]
    torch.testing.assert_close(step, full, atol=1e-4, rtol=1e-4)
    assert int(full.argmax()) == out[-1]


def test_bf16_models_quantize_and_keep_their_dtype(tmp_path):
    model = small_model().to(torch.bfloat16)
    for method in ("int8_weight_only", "nf4"):
        q = apply_transform(copy.deepcopy(model), "quantizer", method)
        assert q.dtype == torch.bfloat16
        with torch.no_grad():
            logits = q(ids()).logits
        assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
        save_model(q, tmp_path / method)
        loaded = load_model(tmp_path / method, dtype="bfloat16")
        assert loaded.dtype == torch.bfloat16
        with torch.no_grad():
            assert torch.equal(loaded(ids()).logits, logits)


def test_tied_head_uses_the_quantized_table_and_stores_it_once():
    q = apply_transform(small_model(), "quantizer", "int8_weight_only")
    assert isinstance(q.lm_head, qz.TiedQuantizedHead) and q.lm_head.table is q.model.embed_tokens
    assert not [k for k in q.state_dict() if k.startswith("lm_head")]
    assert q.dtype == torch.float32  # the model's compute dtype, not the int8 storage


def test_include_exclude_patterns_are_honoured():
    base = small_model()
    no_head = apply_transform(copy.deepcopy(base), "quantizer", "int8_dynamic", exclude=["lm_head"])
    assert type(no_head.lm_head) is type(base.lm_head)  # full precision head, its own copy of the table
    assert no_head.lm_head.weight.dtype == torch.float32
    assert isinstance(no_head.model.embed_tokens, qz.Int8Embedding)

    mlp_only = apply_transform(copy.deepcopy(base), "quantizer", "nf4", include=["*.mlp.*"])
    names = set(qz.quantized_modules(mlp_only))
    assert names == {f"model.layers.{i}.mlp.{p}" for i in range(2) for p in ("gate_proj", "up_proj", "down_proj")}

    short = apply_transform(copy.deepcopy(base), "quantizer", "int8_weight_only", include=["q_proj", "v_proj"])
    expected = {f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")}
    assert set(qz.quantized_modules(short)) == expected

    no_tables = apply_transform(copy.deepcopy(base), "quantizer", "int8_weight_only", embeddings=False)
    assert type(no_tables.model.embed_tokens) is nn.Embedding
    assert no_tables.lm_head.weight is no_tables.model.embed_tokens.weight  # a tied head follows its table


def test_untied_head_is_quantized_as_a_linear():
    q = apply_transform(small_model(tie_embeddings=False), "quantizer", "int8_dynamic")
    assert isinstance(q.lm_head, qz.Int8Linear) and q.lm_head.dynamic


# ----- errors -----------------------------------------------------------------------------------------------------
def test_unknown_method_suggests_the_closest_name(tmp_path):
    with pytest.raises(UnknownComponentError, match="Did you mean 'int8_dynamic'"):
        apply_transform(small_model(), "quantizer", "int8_dynamc")
    save_model(small_model(), tmp_path / "m")
    result = CliRunner().invoke(cli, ["quantize", str(tmp_path / "m"), "--method", "nf5", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "Did you mean 'nf4'" in result.output
    assert not (tmp_path / "o").exists()


def test_bad_options_are_user_errors(tmp_path):
    with pytest.raises(qz.QuantizationError, match="blocksize"):
        apply_transform(small_model(), "quantizer", "nf4", blocksize=48)
    with pytest.raises(qz.QuantizationError, match="patterns"):
        apply_transform(small_model(), "quantizer", "int8_dynamic", exclude=[3])
    save_model(small_model(), tmp_path / "m")
    args = ["quantize", str(tmp_path / "m"), "--method", "int8_dynamic", "--out", str(tmp_path / "o"), "--param", "x=1"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2 and "unknown params ['x']" in result.output


def test_nf4_unavailable_without_bitsandbytes_or_on_an_unsupported_device(monkeypatch):
    # a device bitsandbytes cannot run NF4 on (none exists on a CPU-only test machine: make the probe say so)
    monkeypatch.setattr(qz, "_nf4_probe", lambda device_type: "NotImplementedError: no kernel for xpu")
    with pytest.raises(qz.QuantizerUnavailableError, match=r"nf4 is not available on xpu.*int8_weight_only"):
        qz._require_nf4(torch.device("xpu"))
    monkeypatch.undo()
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # what an environment without it looks like
    qz._bnb.cache_clear()
    qz._nf4_probe.cache_clear()
    try:
        with pytest.raises(qz.QuantizerUnavailableError, match=r"pip install 'llamaforge\[quant\]'"):
            apply_transform(small_model(), "quantizer", "nf4")
        model = apply_transform(small_model(), "quantizer", "int8_dynamic")  # int8 needs no extra library
        assert qz.quantized_modules(model)
    finally:
        monkeypatch.undo()
        qz._bnb.cache_clear()
        qz._nf4_probe.cache_clear()
    assert isinstance(qz.QuantizerUnavailableError("x"), LlamaforgeError)


# ----- a third-party quantizer ------------------------------------------------------------------------------------
class HalfLinear(nn.Module):
    """Stores a linear weight in fp16 (a stand-in for any plugin's storage format)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.register_buffer("weight", weight.detach().half())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias)


class HalfQuantizer(lf.Quantizer):
    """fp16 storage for every nn.Linear the patterns select."""

    def __init__(self, include=None, exclude=None):
        self.include, self.exclude = include, exclude

    def quantize(self, model, include=None, exclude=None):
        for name, module in list(model.named_modules()):
            if type(module) is nn.Linear and qz.selected(name, include, exclude):
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent), child, HalfLinear(module.weight, module.bias))
        return model


@pytest.fixture
def half_quantizer():
    lf.register("quantizer", "test_half", HalfQuantizer)
    yield "test_half"
    lf.registries().quantizer.unregister("test_half")


def test_a_runtime_registered_quantizer_works_like_the_builtins(half_quantizer, tmp_path):
    check_component("quantizer", half_quantizer, max_relative_error=0.01)
    save_model(small_model(), tmp_path / "m")
    args = ["quantize", str(tmp_path / "m"), "--method", half_quantizer, "--out", str(tmp_path / "o"), "--json"]
    result = CliRunner().invoke(cli, [*args, "--exclude", "*.mlp.*"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["bytes_after"] < report["bytes_before"]
    loaded = load_model(tmp_path / "o")
    assert isinstance(loaded.model.layers[0].self_attn.q_proj, HalfLinear)
    assert type(loaded.model.layers[0].mlp.up_proj) is nn.Linear


# ----- the CLI ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A small model with a real tokenizer beside it (random weights: sizes and plumbing, not quality)."""
    from llamaforge.core.tokenizer import train_tokenizer

    source = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinystories" / "valid.txt"
    if not source.exists():
        pytest.skip(f"shared test data not found at {source}")
    text = source.read_text(encoding="utf-8")[:60_000]
    tok = train_tokenizer(text.split("\n\n"), 320)
    root = tmp_path_factory.mktemp("quant")
    model = lf.build_model({**SMALL, "vocab_size": tok.vocab_size, "tie_embeddings": True}, seed=0)
    save_model(model, root / "model")
    tok.save(root / "model")
    (root / "eval.txt").write_text(text[-6000:], encoding="utf-8")
    return root


def test_cli_reports_bytes_on_disk_and_perplexity(model_dir):
    out = model_dir / "int8"
    args = ["quantize", str(model_dir / "model"), "--method", "int8_dynamic", "--out", str(out)]
    args += ["--eval-data", str(model_dir / "eval.txt"), "--seq-len", "32", "--max-batches", "2", "--json"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["bytes_before"] == (model_dir / "model" / WEIGHTS_FILE).stat().st_size
    assert report["bytes_after"] == (out / WEIGHTS_FILE).stat().st_size
    assert report["ratio"] == pytest.approx(report["bytes_before"] / report["bytes_after"])
    assert report["ratio"] > 3.5  # fp32 -> int8 weights and table; at most 4x is possible
    for key in ("perplexity_before", "perplexity_after"):
        assert report[key] > 1 and report[key] < float("inf")
    assert report["quantized_modules"]["int8_dynamic"] == 14  # 7 projections x 2 layers
    # every MODEL-taking command reads the quantized directory (it has the tokenizer too)
    ev = CliRunner().invoke(cli, ["eval", str(out), "--data", str(model_dir / "eval.txt"), "--seq-len", "32", "--json"])
    assert ev.exit_code == 0, ev.output
    gen_args = ["generate", str(out), "--prompt", "Once upon a time", "--greedy", "--max-new-tokens", "5", "--json"]
    gen = CliRunner().invoke(cli, gen_args)
    assert gen.exit_code == 0, gen.output


def test_cli_human_output_and_stacked_methods(model_dir):
    out = model_dir / "stacked"
    args = ["quantize", str(model_dir / "model"), "--method", "int8_embedding", "--method", "nf4", "--out", str(out)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "weights on disk:" in result.output and "x smaller" in result.output
    records = json.loads((out / TRANSFORMS_FILE).read_text())
    assert [r["name"] for r in records] == ["int8_embedding", "nf4"]
    loaded = load_model(out)
    assert isinstance(loaded.model.embed_tokens, qz.Int8Embedding)
    assert isinstance(loaded.model.layers[0].mlp.down_proj, qz.NF4Linear)


# ----- the targets on a trained model (slow: trains `tiny` for a few hundred steps) --------------------------------
@pytest.mark.slow
def test_trained_tiny_model_meets_size_and_quality_targets(shared_data, tmp_path):
    from llamaforge.cli.train import run_training

    data = shared_data / "tinystories"
    overrides = {"steps": 300, "seq_len": 128, "batch_size": 8, "warmup_steps": 20, "eval_every": 300}
    run_training(
        spec_source="tiny",
        data=str(data / "train.txt"),
        val_data=str(data / "valid.txt"),
        out=tmp_path / "run",
        train_overrides=overrides,
        progress=False,
    )
    targets = {"int8_dynamic": (3.5, 0.01), "int8_weight_only": (3.5, 0.01), "nf4": (6.0, 0.05)}
    for method, (min_ratio, max_worse) in targets.items():
        args = ["quantize", str(tmp_path / "run"), "--method", method, "--out", str(tmp_path / method)]
        args += ["--eval-data", str(data / "valid.txt"), "--seq-len", "128", "--max-batches", "20", "--json"]
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 0, result.output
        report = json.loads(result.output)
        assert report["ratio"] >= min_ratio, (method, report)
        assert report["perplexity_change"] <= max_worse, (method, report)
