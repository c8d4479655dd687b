"""The `lora` adapter: identity at init, merge == unmerged, bitwise removal, frozen base, several named adapters."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn

from llamaforge.core import finetune as ft
from llamaforge.core.loading import load_model, save_model
from llamaforge.core.model import build_model
from llamaforge.core.spec import load_spec
from llamaforge.plugins.adapters import LoRA, LoRALayer, match_targets
from llamaforge.testing import check_component

SMALL = {"vocab_size": 64, "dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "max_positions": 32}
NAMES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
IDS = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(3))


@pytest.fixture(autouse=True)
def _single_thread():
    """Tiny models run faster on one thread than on two contended ones (the test machine is shared)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def small_model(tie: bool = False, seed: int = 0, dtype: str = "float32") -> nn.Module:
    return build_model(load_spec("tiny").with_updates(**SMALL, tie_embeddings=tie), seed=seed, dtype=dtype).eval()


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_state(model: nn.Module, state: dict[str, torch.Tensor]) -> bool:
    now = model.state_dict()
    return set(now) == set(state) and all(torch.equal(now[k], state[k]) for k in state)


def randomise(model: nn.Module, name: str, seed: int = 1, scale: float = 0.2) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ft.adapter_parameters(model, name):
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


targets_st = st.lists(st.sampled_from(NAMES), min_size=1, max_size=4, unique=True)


@settings(max_examples=5)
@given(targets=targets_st, rank=st.integers(1, 6), alpha=st.floats(0.5, 32), rslora=st.booleans())
def test_lora_passes_the_adapter_contract(targets, rank, alpha, rslora):
    check_component("adapter", "lora", params={"targets": targets, "rank": rank, "alpha": alpha, "rslora": rslora})


@settings(max_examples=6)
@given(targets=targets_st, rank=st.integers(1, 8), tie=st.booleans())
def test_zero_initialised_b_leaves_outputs_unchanged(targets, rank, tie):
    model = small_model(tie=tie)
    before = logits(model)
    ft.add_adapter(model, "lora", rank=rank, targets=targets)
    assert all(torch.count_nonzero(layer.lora_B["default"].weight) == 0 for layer in ft.adapter_layers(model).values())
    assert all(torch.count_nonzero(layer.lora_A["default"].weight) > 0 for layer in ft.adapter_layers(model).values())
    torch.testing.assert_close(logits(model), before, atol=1e-6, rtol=1e-6)


@settings(max_examples=6)
@given(
    targets=targets_st,
    rank=st.integers(1, 6),
    scale=st.floats(0.01, 0.5),
    rslora=st.booleans(),
    float64=st.booleans(),
)
# drawn on 2026-12-03: fp32 merged and unmerged logits 4.75e-4 apart at logits up to 63.7 (rounding, not algebra)
@example(targets=["q_proj", "k_proj", "v_proj", "lm_head"], rank=4, scale=0.5, rslora=True, float64=False)
@example(targets=["q_proj", "k_proj", "v_proj", "lm_head"], rank=4, scale=0.5, rslora=True, float64=True)
def test_merged_equals_unmerged_and_unmerge_is_exact(targets, rank, scale, rslora, float64):
    model = small_model(tie=False)
    if float64:  # the algebra itself: float64 base, float64 factors, float64 merge
        model = model.double()
    base = snapshot(model)
    ft.add_adapter(model, "lora", rank=rank, alpha=2.0 * rank, targets=targets, rslora=rslora)
    assert {p.dtype for p in ft.adapter_parameters(model)} == {torch.float64 if float64 else torch.float32}
    randomise(model, "default", scale=scale)
    unmerged = logits(model)
    ft.merge_adapters(model)
    # merging reorders the sums (x @ (W + s B A) against x @ W + s (x @ A) @ B): in fp32 the difference is rounding
    # of the logits' size (large adapter updates push them past 60), so the bound follows their magnitude
    size = unmerged.abs().max().item()
    tol = 1e-10 if float64 else 2e-5
    torch.testing.assert_close(logits(model), unmerged, atol=tol * max(1.0, size), rtol=tol)
    # the saved state of a merged model is the unmerged one: reloading it cannot apply the update twice
    assert all(torch.equal(model.state_dict()[k], base[k]) for k in base)
    ft.unmerge_adapters(model)
    torch.testing.assert_close(logits(model), unmerged, atol=1e-12 if float64 else 1e-5, rtol=1e-5)
    ft.remove_adapter(model)
    assert same_state(model, base)


@settings(max_examples=6)
@given(targets=targets_st, merge_first=st.booleans(), two=st.booleans())
def test_remove_restores_the_base_bitwise(targets, merge_first, two):
    model = small_model(tie=False)
    base = snapshot(model)
    classes = {n: type(m) for n, m in model.named_modules()}
    before = logits(model)
    ft.add_adapter(model, "lora", name="a", rank=3, targets=targets)
    randomise(model, "a")
    if two:
        ft.add_adapter(model, "lora", name="b", rank=2, targets=["v_proj", "down_proj"])
        randomise(model, "b", seed=2)
        ft.set_adapter(model, ["a", "b"])
    if merge_first:
        ft.merge_adapters(model)
    ft.remove_adapter(model, "a")
    if two:
        ft.remove_adapter(model, "b")
    assert same_state(model, base)
    assert {n: type(m) for n, m in model.named_modules()} == classes
    assert torch.equal(logits(model), before)
    assert ft.adapter_names(model) == []


def test_base_tensor_names_stay_and_adapter_tensors_are_listed():
    model = small_model()
    names = set(model.state_dict())
    ft.add_adapter(model, "lora", name="task", rank=2, targets="q_proj,lm_head")
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, nn.Linear) and isinstance(q, LoRALayer)
    assert names <= set(model.state_dict())
    extra = set(model.state_dict()) - names
    assert "model.layers.0.self_attn.q_proj.lora_A.task.weight" in extra
    assert "lm_head.lora_B.task.weight" in extra
    assert set(ft.adapter_state_dict(model, "task")) == {
        f"{m}.lora_{f}.weight"
        for m in ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "lm_head")
        for f in "AB"
    }


def test_only_adapter_parameters_get_gradients_and_optimizer_state():
    model = small_model()
    base = snapshot(model)
    ft.add_adapter(model, "lora", name="a", rank=4, targets="attention,mlp")
    ft.add_adapter(model, "lora", name="other", rank=2, targets="q_proj")
    ft.set_adapter(model, "a")
    params = ft.mark_only_adapter_trainable(model, "a")
    model.train()
    model(IDS, IDS).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {n for n, p in model.named_parameters() if any(p is q for q in params)}
    assert all(".lora_" in n and ".a." in n for n in with_grad) and len(with_grad) == 2 * 2 * 7
    optimizer = ft.adapter_optimizer(params, ft.FinetuneConfig())
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for p in params}

    # a few real steps: adapter "a" moves, the base and adapter "other" do not
    other_before = {k: v.clone() for k, v in ft.adapter_state_dict(model, "other").items()}
    batches = iter([(IDS, IDS)] * 5)
    result = ft.finetune(model, batches, ft.FinetuneConfig(steps=5, lr=1e-2, warmup_steps=0, device="cpu"), adapter="a")
    assert result.trainable_params == sum(p.numel() for p in ft.adapter_parameters(model, "a"))
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in base.items())
    assert all(torch.equal(ft.adapter_state_dict(model, "other")[k], v) for k, v in other_before.items())
    assert any(torch.count_nonzero(layer.lora_B["a"].weight) for layer in ft.adapter_layers(model).values())


def test_several_named_adapters_switch_disable_and_sum():
    model = small_model()
    base_out = logits(model)
    ft.add_adapter(model, "lora", name="a", rank=2, targets="q_proj,v_proj")
    randomise(model, "a", seed=1)
    ft.add_adapter(model, "lora", name="b", rank=3, targets="v_proj,up_proj")
    randomise(model, "b", seed=2)
    assert ft.active_adapters(model) == ["b"]  # the one just added is in use
    out_b = logits(model)
    ft.set_adapter(model, "a")
    out_a = logits(model)

    only_a = small_model()
    ft.add_adapter(only_a, "lora", name="a", rank=2, targets="q_proj,v_proj")
    randomise(only_a, "a", seed=1)
    torch.testing.assert_close(out_a, logits(only_a), atol=0, rtol=0)
    assert (out_a - out_b).abs().max() > 1e-3

    ft.set_adapter(model, ["a", "b"])
    layer = model.model.layers[0].self_attn.v_proj
    x = torch.randn(3, 32)
    with torch.no_grad():
        expected = nn.functional.linear(x, layer.weight) + sum((layer.delta_weight(n) @ x.T).T for n in ("a", "b"))
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)

    with ft.adapters_disabled(model):
        torch.testing.assert_close(logits(model), base_out, atol=1e-6, rtol=1e-6)
    ft.merge_adapters(model)
    with pytest.raises(ft.AdapterError, match="unmerge"):
        ft.set_adapter(model, "a")
    with pytest.raises(ft.AdapterError, match="unmerge"):
        ft.disable_adapters(model)
    ft.unmerge_adapters(model)
    with pytest.raises(ft.AdapterError, match="no adapter named 'c'"):
        ft.set_adapter(model, "c")
    with pytest.raises(ft.AdapterError, match="already has an adapter named 'a'"):
        ft.add_adapter(model, "lora", name="a", targets="q_proj")


@pytest.mark.parametrize("rslora", [False, True])
def test_scaling_is_alpha_over_rank_or_its_square_root(rslora):
    model = small_model()
    ft.add_adapter(model, "lora", rank=4, alpha=8.0, targets="o_proj", rslora=rslora)
    layer = model.model.layers[1].self_attn.o_proj
    randomise(model, "default")
    expected_scale = 8.0 / (math.sqrt(4) if rslora else 4)
    b, a = layer.lora_B["default"].weight, layer.lora_A["default"].weight
    x = torch.randn(5, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            layer(x), nn.functional.linear(x, layer.weight) + expected_scale * (x @ a.T @ b.T), atol=1e-5, rtol=1e-5
        )


def test_targets_must_match_linear_layers():
    model = small_model()
    with pytest.raises(ft.AdapterError, match=r"matches no module.*q_proj"):
        ft.add_adapter(model, "lora", targets="query")
    with pytest.raises(ft.AdapterError, match="not linear layers"):
        ft.add_adapter(model, "lora", targets="self_attn")
    with pytest.raises(ft.AdapterError, match="rank"):
        LoRA(rank=0)
    assert ft.adapter_names(model) == []
    assert match_targets(model, "model.layers.1.*_proj") == [
        f"model.layers.1.{p}" for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
    ] + [f"model.layers.1.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")]


def test_tied_head_adapter_trains_but_refuses_to_merge():
    model = small_model(tie=True)
    ft.add_adapter(model, "lora", targets="lm_head")
    randomise(model, "default")
    assert model.lm_head.projection() is None  # the fused loss path must not skip the adapter
    with torch.no_grad():
        loss_fused_path = model(IDS, IDS, return_logits=False).loss
        loss_logits = model(IDS, IDS).loss
    torch.testing.assert_close(loss_fused_path, loss_logits, atol=1e-5, rtol=1e-5)
    with pytest.raises(ft.AdapterError, match="tied"):
        ft.merge_adapters(model)


def test_adapter_only_checkpoint_round_trip(tmp_path):
    model = small_model()
    ft.add_adapter(model, "lora", name="style", rank=2, alpha=4, targets="k_proj,down_proj", dropout=0.1)
    randomise(model, "style")
    expected = logits(model)
    ft.save_adapter(model, tmp_path / "ad", "style")
    size = sum(f.stat().st_size for f in (tmp_path / "ad").iterdir())
    assert size < 0.1 * sum(t.numel() * 4 for t in small_model().state_dict().values())

    fresh = small_model()
    ft.load_adapter(fresh, tmp_path / "ad")
    assert ft.adapter_names(fresh) == ["default"]
    torch.testing.assert_close(logits(fresh), expected, atol=0, rtol=0)
    assert not any(p.requires_grad for p in ft.adapter_parameters(fresh))

    wrong = build_model(load_spec("tiny").with_updates(**{**SMALL, "dim": 48}, tie_embeddings=False), seed=0)
    with pytest.raises(ft.AdapterError, match="different base model"):
        ft.load_adapter(wrong, tmp_path / "ad")


def test_model_directory_keeps_unmerged_and_merged_adapters(tmp_path):
    model = small_model()
    ft.add_adapter(model, "lora", name="a", rank=2, targets="q_proj,v_proj")
    randomise(model, "a")
    expected = logits(model)
    save_model(model, tmp_path / "unmerged")
    ft.merge_adapters(model)
    save_model(model, tmp_path / "merged")
    for sub in ("unmerged", "merged"):
        loaded = load_model(tmp_path / sub)
        assert ft.adapter_names(loaded) == ["a"]
        torch.testing.assert_close(logits(loaded), expected, atol=1e-5, rtol=1e-5)
    ft.merge_and_remove(model)
    save_model(model, tmp_path / "plain")
    assert not (tmp_path / "plain" / "transforms.json").exists()
    torch.testing.assert_close(logits(load_model(tmp_path / "plain")), expected, atol=1e-4, rtol=1e-4)


class FakeQuantLinear(nn.Module):
    """A Linear-like module with no `weight` parameter (int8 codes + scales), like a quantized layer."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach()
        scale = w.abs().amax(dim=1, keepdim=True) / 127
        self.register_buffer("codes", torch.round(w / scale).to(torch.int8))
        self.register_buffer("scales", scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.codes.float() * self.scales)


def test_lora_wraps_any_linear_like_module_and_trains_on_it():
    model = small_model()
    for block in model.model.layers:
        block.self_attn.q_proj = FakeQuantLinear(block.self_attn.q_proj)
        block.self_attn.v_proj = FakeQuantLinear(block.self_attn.v_proj)
    base = snapshot(model)
    before = logits(model)
    ft.add_adapter(model, "lora", rank=4, targets="q_proj,v_proj")
    assert "model.layers.0.self_attn.q_proj.codes" in model.state_dict()
    torch.testing.assert_close(logits(model), before, atol=1e-6, rtol=1e-6)
    batches = iter([(IDS, IDS)] * 16)
    config = ft.FinetuneConfig(steps=16, lr=3e-2, warmup_steps=0, device="cpu", log_every=4)
    result = ft.finetune(model, batches, config)
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"] - 0.05
    with pytest.raises(ft.AdapterError, match="quantized base"):
        ft.merge_adapters(model)
    ft.remove_adapter(model)
    assert same_state(model, base)
    assert type(model.model.layers[0].self_attn.q_proj) is FakeQuantLinear


def test_bf16_base_with_float32_adapter_and_dropout_only_in_training():
    model = small_model(dtype="bfloat16")
    ft.add_adapter(model, "lora", rank=2, targets="q_proj", dropout=0.5)
    randomise(model, "default")
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.lora_A["default"].weight.dtype == torch.float32
    x = torch.randn(4, 32, dtype=torch.bfloat16)
    with torch.no_grad():
        assert layer(x).dtype == torch.bfloat16
        assert torch.equal(layer(x), layer(x))  # eval: no dropout
        layer.train()
        torch.manual_seed(0)
        first = layer(x)
        torch.manual_seed(1)
        assert not torch.equal(first, layer(x))
