"""Sampler plugins: contracts, the properties each one promises, and composition with third-party samplers."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import llamaforge
from llamaforge.core.generation import GenerationConfig, GenerationError, build_pipeline, choose_tokens
from llamaforge.core.interfaces import Sampler
from llamaforge.testing import check_component

BUILTINS = {
    "greedy": {},
    "temperature": {"temperature": 0.7},
    "top_k": {"top_k": 3},
    "top_p": {"top_p": 0.8},
    "min_p": {"min_p": 0.05},
    "repetition_penalty": {"penalty": 1.3},
}


@pytest.mark.parametrize("name", sorted(BUILTINS))
def test_builtin_samplers_pass_the_contract(name):
    check_component("sampler", name, params=BUILTINS[name])


def test_contract_catches_a_broken_sampler():
    class InPlace(Sampler):
        def __call__(self, logits, input_ids):
            return logits.mul_(2)

    with pytest.raises(AssertionError, match="in place"):
        check_component("sampler", InPlace)


def test_contract_catches_a_plain_argmax_claim_that_changes_the_logits():
    class Claims(Sampler):
        chooses = True
        plain_argmax = True  # would let the compiled greedy step skip it, losing the penalty below

        def __call__(self, logits, input_ids):
            return logits - 1.0

    with pytest.raises(AssertionError, match="unchanged"):
        check_component("sampler", Claims)


def _logits(seed: int, rows: int = 3, vocab: int = 50) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 2


@settings(max_examples=30)
@given(seed=st.integers(0, 10_000), k=st.integers(1, 12))
def test_top_k_never_samples_outside_the_top_k(seed, k):
    logits = _logits(seed)
    stages = build_pipeline(GenerationConfig.from_options(temperature=2.0, top_k=k).samplers)
    gen = torch.Generator().manual_seed(seed)
    top = torch.topk(logits, k, dim=-1).indices
    for _ in range(20):
        tokens = choose_tokens(stages, logits, torch.empty(3, 0, dtype=torch.long), gen)
        assert (top == tokens[:, None]).any(-1).all()


@settings(max_examples=40)
@given(seed=st.integers(0, 10_000), p=st.floats(0.05, 0.99))
def test_top_p_keeps_the_smallest_nucleus(seed, p):
    logits = _logits(seed)
    stage = build_pipeline([{"name": "top_p", "params": {"top_p": p}}])[0]
    kept = stage(logits, torch.empty(3, 0, dtype=torch.long)) > float("-inf")
    probs = torch.softmax(logits, -1)
    for row in range(logits.size(0)):
        kp, dp = probs[row][kept[row]], probs[row][~kept[row]]
        assert kp.sum() >= p - 1e-6, "the nucleus must reach p"
        if dp.numel():
            assert kp.min() >= dp.max(), "the nucleus must be the most likely tokens"
        assert kp.sum() - kp.min() < p + 1e-6, "dropping the least likely kept token must fall below p"


def test_min_p_keeps_tokens_relative_to_the_top():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    stage = build_pipeline([{"name": "min_p", "params": {"min_p": 0.5}}])[0]
    kept = stage(logits, torch.empty(1, 0, dtype=torch.long)) > float("-inf")
    assert kept.tolist() == [[True, True, False, False]]


def test_repetition_penalty_lowers_seen_tokens_only():
    logits = torch.tensor([[2.0, -1.0, 0.5, 1.0]])
    stage = build_pipeline([{"name": "repetition_penalty", "params": {"penalty": 2.0}}])[0]
    out = stage(logits, torch.tensor([[0, 1, -1]]))
    assert out.tolist() == [[1.0, -2.0, 0.5, 1.0]]


def test_temperature_sharpens_and_flattens():
    logits = _logits(3)
    low = build_pipeline([{"name": "temperature", "params": {"temperature": 0.5}}])[0]
    high = build_pipeline([{"name": "temperature", "params": {"temperature": 2.0}}])[0]
    ent = lambda x: -(torch.softmax(x, -1) * torch.log_softmax(x, -1)).sum(-1)
    ctx = torch.empty(3, 0, dtype=torch.long)
    assert (ent(low(logits, ctx)) < ent(logits)).all() and (ent(high(logits, ctx)) > ent(logits)).all()


def test_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.1]])).expand(4000, 3)
    stages = build_pipeline(GenerationConfig.from_options(temperature=1.0, top_k=3).samplers)
    tokens = choose_tokens(stages, logits, torch.empty(4000, 0, dtype=torch.long), torch.Generator().manual_seed(0))
    freq = torch.bincount(tokens, minlength=3).float() / 4000
    torch.testing.assert_close(freq, torch.tensor([0.6, 0.3, 0.1]), atol=0.03, rtol=0)


def test_from_options_builds_the_pipeline_in_order():
    config = GenerationConfig.from_options(repetition_penalty=1.2, temperature=0.8, top_k=40, top_p=0.9, min_p=0.1)
    assert [s.name for s in config.samplers] == ["repetition_penalty", "temperature", "top_k", "top_p", "min_p"]
    assert [s.name for s in GenerationConfig.from_options().samplers] == ["greedy"]
    assert [s.name for s in GenerationConfig.from_options(temperature=0).samplers] == ["greedy"]
    with pytest.raises(GenerationError, match="greedy"):
        GenerationConfig.from_options(greedy=True, top_k=5)


def test_bad_sampler_params_and_names_are_clear_errors():
    with pytest.raises(GenerationError, match="top_k"):
        build_pipeline([{"name": "top_k", "params": {"top_k": 0}}])
    with pytest.raises(llamaforge.UnknownComponentError, match="top_k"):
        build_pipeline(["top_kk"])


def test_yaml_generation_spec(tmp_path):
    path = tmp_path / "gen.yaml"
    path.write_text(
        "max_new_tokens: 7\nseed: 3\nsamplers:\n"
        "  - {name: temperature, params: {temperature: 0.5}}\n"
        "  - {name: top_k, params: {top_k: 4}}\n"
    )
    config = GenerationConfig.load(path)
    assert config.max_new_tokens == 7 and config.seed == 3
    assert [(s.name, s.params) for s in config.samplers] == [
        ("temperature", {"temperature": 0.5}),
        ("top_k", {"top_k": 4}),
    ]
    path.write_text("max_new_tokens: 7\nsamplerz: []\n")
    with pytest.raises(GenerationError, match="samplerz"):
        GenerationConfig.load(path)


class OnlyEven(Sampler):
    """A third-party stage: forbids odd token ids."""

    def __call__(self, logits, input_ids):
        odd = torch.arange(logits.size(-1), device=logits.device) % 2 == 1
        return logits.masked_fill(odd, float("-inf"))


@pytest.fixture
def only_even():
    llamaforge.register("sampler", "only_even_test", OnlyEven)
    yield "only_even_test"
    llamaforge.registries().sampler.unregister("only_even_test")


def test_runtime_registered_sampler_composes_in_the_pipeline(only_even):
    check_component("sampler", only_even)
    model = llamaforge.build_model("tiny", seed=0).eval()
    from llamaforge.core.generation import generate

    for samplers in ([only_even, "greedy"], [{"name": "temperature", "params": {"temperature": 1.5}}, only_even]):
        out = generate(model, [[1, 2, 3], [9]], GenerationConfig(max_new_tokens=12, samplers=samplers, seed=0))
        assert all(t % 2 == 0 for row in out for t in row), out


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"samplers": "greedy"}, "ordered list"),
        ({"samplers": [{"nam": "greedy"}]}, "name"),
        ({"max_new_tokens": "5"}, "integer"),
    ],
)
def test_bad_generation_configs_are_one_line_errors(kwargs, message):
    with pytest.raises(GenerationError, match=message) as info:
        GenerationConfig(**kwargs)
    assert "\n" not in str(info.value)
