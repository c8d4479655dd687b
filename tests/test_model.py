from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llamaforge import build_model, load_spec
from llamaforge.plugins.attention import RopeAttention
from llamaforge.testing import check_component, check_model, specs


@settings(max_examples=25)
@given(specs())
def test_model_contract_for_any_valid_spec(spec):
    check_model(spec)


@settings(max_examples=15)
@given(specs(kernels=("sdpa",)), st.integers(1, 12))
def test_eager_and_sdpa_agree(spec, seq):
    a = build_model(spec, seed=1).eval()
    b = build_model(spec.with_updates(attention_kernel="eager"), seed=1).eval()
    assert set(a.state_dict()) == set(b.state_dict())
    ids = torch.randint(0, spec.vocab_size, (2, seq))
    with torch.no_grad():
        torch.testing.assert_close(a(ids).logits, b(ids).logits, atol=1e-5, rtol=1e-4)


@settings(max_examples=15)
@given(specs(), st.integers(2, 20), st.integers(1, 6))
def test_kv_cache_matches_full_forward(spec, seq, prefill):
    model = build_model(spec, seed=2).eval()
    prefill = min(prefill, seq)
    ids = torch.randint(0, spec.vocab_size, (2, seq))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache(2, seq + 3)
        parts = [model(ids[:, :prefill], cache=cache, cache_position=torch.arange(prefill)).logits]
        for t in range(prefill, seq):
            parts.append(model(ids[:, t : t + 1], cache=cache, cache_position=torch.tensor([t])).logits)
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-4, rtol=1e-4)


def test_kv_cache_in_one_buffer_per_layer_stores_and_serves_the_same(monkeypatch):
    """`cache._ONE_WRITE`: keys and values of a layer in one buffer, written by one assignment; the same logits, the
    same stored keys and values, the same size, and reset clears it."""
    from llamaforge.core import cache as cache_mod

    model = build_model("tiny", seed=1).eval()
    ids = torch.randint(0, 4096, (2, 9))
    caches, logits = {}, {}
    for one in (False, True):
        monkeypatch.setattr(cache_mod, "_ONE_WRITE", one)
        cache = caches[one] = model.new_cache(2, 12)
        with torch.no_grad():
            parts = [model(ids[:, :5], cache=cache, cache_position=torch.arange(5)).logits]
            for t in range(5, 9):
                parts.append(model(ids[:, t : t + 1], cache=cache, cache_position=torch.tensor([t])).logits)
        logits[one] = torch.cat(parts, 1)
    assert caches[True].kv is not None and caches[False].kv is None
    torch.testing.assert_close(logits[True], logits[False], atol=0, rtol=0)
    for a, b in zip([*caches[True].keys, *caches[True].values], [*caches[False].keys, *caches[False].values]):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert caches[True].nbytes() == caches[False].nbytes()
    caches[True].reset()
    assert all(float(t.abs().sum()) == 0 for t in caches[True].kv)


def test_left_padding_matches_unpadded():
    model = build_model("tiny", seed=0).eval()
    ids = torch.randint(0, 4096, (1, 7))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1)
    mask = torch.cat([torch.zeros(1, 3), torch.ones(1, 7)], 1).long()
    with torch.no_grad():
        ref = model(ids).logits
        out = model(padded, attention_mask=mask).logits[:, 3:]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)


def test_loss_ignores_minus_100_and_chunked_loss_matches():
    model = build_model("tiny", seed=0)
    ids = torch.randint(0, 4096, (2, 16))
    targets = ids.clone()
    targets[:, :5] = -100
    full = model(ids, targets)
    chunked = model(ids, targets, return_logits=False)
    assert chunked.logits is None
    torch.testing.assert_close(full.loss, chunked.loss)
    h = model.hidden_states(ids)
    torch.testing.assert_close(model.loss_from_hidden(h, targets, chunk_tokens=7), full.loss)
    manual = torch.nn.functional.cross_entropy(full.logits[:, 5:].reshape(-1, 4096).float(), ids[:, 5:].reshape(-1))
    torch.testing.assert_close(full.loss, manual)


def test_chunked_loss_gradients_match():
    model = build_model("tiny", seed=0)
    ids = torch.randint(0, 4096, (2, 16))
    model(ids, ids).loss.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    h = model.hidden_states(ids)
    model.loss_from_hidden(h, ids, chunk_tokens=5).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], atol=1e-6, rtol=1e-4, msg=n)


def test_tied_embeddings_share_one_tensor():
    model = build_model("tiny")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.num_parameters() == sum(p.numel() for p in model.parameters())


def test_seed_feedforward_matches_the_chapter_layout():
    model = build_model("seed-feedforward")
    names = dict(model.named_parameters())
    assert names["lm_head.fc.weight"].shape == (288, 288)
    assert names["lm_head.proj.weight"].shape == (32001, 288)
    assert names["lm_head.proj.bias"].shape == (32001,)
    assert model.num_parameters() == 18_547_809
    check_model(load_spec("seed-feedforward").with_updates(vocab_size=100, pad_token_id=None, bos_token_id=None))


def test_bf16_keeps_rope_frequencies_fp32():
    model = build_model("tiny", dtype="bfloat16")
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32
    out = model(torch.randint(0, 4096, (1, 8))).logits
    assert out.dtype == torch.bfloat16


@pytest.mark.parametrize(
    "kind,name",
    [
        ("norm", "rmsnorm"),
        ("norm", "layernorm"),
        ("norm", "identity"),
        ("activation", "swiglu"),
        ("activation", "geglu"),
        ("activation", "gelu"),
        ("activation", "relu"),
        ("activation", "silu"),
        ("attention", "rope_attention"),
        ("attention_kernel", "sdpa"),
        ("attention_kernel", "eager"),
        ("attention_kernel", "flash_decode"),
        ("position_embedding", "rope"),
        ("position_embedding", "none"),
        ("head", "linear"),
        ("head", "mlp"),
    ],
)
def test_builtin_contracts(kind, name):
    check_component(kind, name)


def test_attention_contract_covers_prenorm_also_through_the_fused_decode_route(monkeypatch):
    """rope_attention accepts the block's norm (`accepts_prenorm`): the contract compares forward(x, prenorm=norm)
    with forward(norm(x)), also with the fused q/k/v route on (its one-token step folds the RMSNorm into the op); an
    implementation that declares the protocol but ignores the norm fails it."""
    from llamaforge.plugins import attention

    monkeypatch.setattr(attention, "_FUSED_QKV_ROPE", True)
    check_component("attention", "rope_attention")
    with pytest.raises(AssertionError, match=r"input_layernorm|prenorm"):  # caught by the gradient check first
        check_component("attention", IgnoresNorm)


class IgnoresNorm(RopeAttention):
    """Declares `accepts_prenorm` (inherited) but drops the norm: the contract must catch it."""

    def forward(self, x, *, prenorm=None, **kwargs):
        return super().forward(x, **kwargs)


def test_import_escape_hatch():
    spec = load_spec("tiny").with_updates(norm="py:llamaforge.plugins.norms:LayerNorm")
    model = build_model(spec)
    assert type(model.model.layers[0].input_layernorm).__name__ == "LayerNorm"


def test_fused_linear_cross_entropy_matches_reference():
    from llamaforge.core.losses import linear_cross_entropy

    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 37, 16, generator=g, requires_grad=True)
    w = torch.randn(50, 16, generator=g, requires_grad=True)
    b = torch.randn(50, generator=g, requires_grad=True)
    t = torch.randint(0, 50, (2, 37), generator=g)
    t[0, :5] = -100
    ref = torch.nn.functional.cross_entropy(torch.nn.functional.linear(h, w, b).view(-1, 50), t.view(-1))
    ref.backward()
    grads = [x.grad.clone() for x in (h, w, b)]
    for x in (h, w, b):
        x.grad = None
    out = linear_cross_entropy(h, w, t, b, chunk_tokens=10)
    (3 * out).backward()
    torch.testing.assert_close(out, ref)
    for x, ref_grad in zip((h, w, b), grads):
        torch.testing.assert_close(x.grad, 3 * ref_grad, atol=1e-6, rtol=1e-5)


def test_eager_and_compiled_chunk_functions_agree():
    """The CUDA path compiles `_chunk_loss_and_grad`; other devices run the log_softmax form. Same numbers."""
    from llamaforge.core import losses

    g = torch.Generator().manual_seed(1)
    h, w, b = torch.randn(23, 16, generator=g), torch.randn(50, 16, generator=g), torch.randn(50, generator=g)
    t = torch.randint(0, 50, (23,), generator=g)
    t[3:6] = losses.IGNORE_INDEX
    for want_grad in (True, False):
        a = losses._chunk_loss_and_grad(h, w, b, t, want_grad)
        e = losses._chunk_loss_and_grad_eager(h, w, b, t, want_grad)
        torch.testing.assert_close(e[0], a[0])
        if want_grad:
            torch.testing.assert_close(e[1], a[1], atol=1e-7, rtol=1e-5)
            assert e[1][3:6].abs().sum() == 0  # ignored rows contribute no gradient
        else:
            assert a[1] is None and e[1] is None


@pytest.mark.filterwarnings("ignore:dynamo_pgo force disabled")
def test_compiled_chunk_function_gives_the_reference_gradient():
    """What CUDA runs: `_chunk_loss_and_grad` through inductor (here on CPU) equals autograd's gradient of the
    summed cross-entropy with respect to the logits, ignored rows and bf16 output included."""
    from llamaforge.core import losses

    g = torch.Generator().manual_seed(2)
    h, w = torch.randn(37, 16, generator=g), torch.randn(300, 16, generator=g)
    t = torch.randint(0, 300, (37,), generator=g)
    t[[0, 5, 36]] = losses.IGNORE_INDEX
    t[1] = 299  # the last column
    logits = (h @ w.T).requires_grad_()
    ref = torch.nn.functional.cross_entropy(logits, t, reduction="sum", ignore_index=losses.IGNORE_INDEX)
    ref.backward()
    torch._dynamo.reset()
    fn = torch.compile(losses._chunk_loss_and_grad, dynamic=False)
    loss, grad = fn(h, w, None, t, True)
    torch.testing.assert_close(loss, ref.detach())
    torch.testing.assert_close(grad, logits.grad, atol=1e-6, rtol=1e-5)
    _, grad16 = fn(h.bfloat16(), w.bfloat16(), None, t, True)
    assert grad16.dtype == torch.bfloat16 and grad16[[0, 5, 36]].abs().sum() == 0
    torch.testing.assert_close(grad16.float(), logits.grad, atol=2e-2, rtol=5e-2)
    # the one-hot is pointwise: no scatter, which would make inductor write the fp32 softmax out and re-read it
    from torch.fx.experimental.proxy_tensor import make_fx

    traced = make_fx(lambda *a: losses._chunk_loss_and_grad(*a, True))(h, w, None, t)
    assert not [n for n in traced.graph.nodes if "scatter" in str(n.target)]


def test_mlp_head_loss_path_matches():
    model = build_model(load_spec("seed-feedforward").with_updates(vocab_size=64, pad_token_id=None, bos_token_id=None))
    ids = torch.randint(0, 64, (2, 12))
    full = model(ids, ids).loss
    fast = model(ids, ids, return_logits=False).loss
    torch.testing.assert_close(full, fast)
    h = model.hidden_states(ids)
    torch.testing.assert_close(model.loss_from_hidden(h, ids, chunk_tokens=5), full)


def _flags(model):
    return [m.training for m in model.modules()]


def test_submodules_is_the_module_set_once_each():
    from llamaforge.core.model import submodules

    model = build_model(load_spec("tiny"), seed=0)
    model.model.layers[1].extra = model.model.layers[0].mlp  # a module reachable twice
    mods = submodules(model)
    assert len(mods) == len({id(m) for m in mods})
    assert {id(m) for m in mods} == {id(m) for m in model.modules()}


def test_eval_mode_restores_each_module_flag_even_after_an_error():
    from llamaforge.core.model import eval_mode

    model = build_model(load_spec("tiny"), seed=0)
    model.train()
    model.model.layers[0].eval()  # a frozen block kept in eval mode inside a training model
    before = _flags(model)
    assert any(before) and not all(before)
    with pytest.raises(RuntimeError):
        with eval_mode(model):
            assert not any(_flags(model))
            raise RuntimeError("boom")
    assert _flags(model) == before
    model.train()
    with eval_mode(model):
        assert not any(_flags(model))
    assert all(_flags(model))


def test_eval_mode_leaves_an_eval_model_untouched(monkeypatch):
    from llamaforge.core.model import eval_mode

    model = build_model(load_spec("tiny"), seed=0).eval()
    calls = []
    monkeypatch.setattr(torch.nn.Module, "train", lambda self, mode=True: calls.append(mode) or self)
    with eval_mode(model) as inside:
        assert inside is model and not any(_flags(model))
    assert calls == [] and not any(_flags(model))


def test_generation_and_evaluation_give_a_training_model_its_flags_back():
    from llamaforge.core.evaluate import evaluate
    from llamaforge.core.generation import GenerationConfig, generate

    model = build_model(load_spec("tiny"), seed=0)
    model.train()
    model.model.layers[-1].eval()
    before = _flags(model)
    generate(model, [[1, 2, 3]], GenerationConfig(max_new_tokens=2, compile=False, cuda_graph=False))
    assert _flags(model) == before
    evaluate(model, torch.randint(0, model.spec.vocab_size, (200,)), seq_len=16, batch_size=2)
    assert _flags(model) == before


def test_attention_contract_covers_the_residual_also_through_the_fused_output_kernel(monkeypatch):
    """rope_attention takes the block's residual (`accepts_residual`): the contract compares forward(x, residual=r)
    with r + forward(x), also with the residual kernel's route on (its one-token step adds r inside o_proj's op); an
    implementation that declares the protocol but drops the residual fails it."""
    from llamaforge.kernels import residual_gemv

    monkeypatch.setattr(residual_gemv, "PLAIN", True)
    check_component("attention", "rope_attention")
    with pytest.raises(AssertionError, match="residual"):
        check_component("attention", DropsResidual)


class DropsResidual(RopeAttention):
    """Declares `accepts_residual` (inherited) but drops the residual: the contract must catch it."""

    def forward(self, x, *, residual=None, **kwargs):
        return super().forward(x, **kwargs)
