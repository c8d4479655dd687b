"""The plugin author's own test suite: llamaforge's contract checks, one call per component."""

from __future__ import annotations

from hypothesis import given, settings

from llamaforge.testing import check_component, check_model, specs


def test_relu2_activation_contract():
    check_component("activation", "relu2")


def test_scalenorm_contract():
    check_component("norm", "scalenorm")


@settings(max_examples=8, deadline=None)
@given(specs(activations=("relu2",), norms=("scalenorm", "rmsnorm")))
def test_models_using_the_plugin(spec):
    check_model(spec)


def test_suppress_tokens_sampler_contract():
    check_component("sampler", "suppress_tokens", params={"token_ids": [0, 3, 5]})


def test_suppress_tokens_composes_with_builtin_samplers():
    import llamaforge
    from llamaforge.core.generation import GenerationConfig, generate

    model = llamaforge.build_model("tiny", seed=0).eval()
    prompts = [[1, 2, 3], [7]]
    free = generate(model, prompts, GenerationConfig(max_new_tokens=6))
    banned = sorted({t for row in free for t in row})
    for samplers in (
        [{"name": "suppress_tokens", "params": {"token_ids": banned}}, "greedy"],
        [
            {"name": "temperature", "params": {"temperature": 1.5}},
            {"name": "suppress_tokens", "params": {"token_ids": banned}},
        ],
    ):
        out = generate(model, prompts, GenerationConfig(max_new_tokens=6, samplers=samplers, seed=0))
        assert not {t for row in out for t in row} & set(banned)
