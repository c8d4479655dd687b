from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llamaforge import ModelSpec, SpecError, build_model, load_spec
from llamaforge.core.sizing import spec_summary
from llamaforge.testing import specs

PUBLISHED = {
    "llama3-8b": 8_030_261_248,
    "llama3.2-1b": 1_235_814_400,
    "llama3-70b": 70_553_706_496,
    "seed-feedforward": 18_547_809,
}


@pytest.mark.parametrize("name,count", sorted(PUBLISHED.items()))
def test_published_parameter_counts(name, count):
    assert spec_summary(name)["params"] == count


def test_presets_all_build_on_meta():
    for name in ("llama3.1-8b", "llama3.2-3b", "tiny", "seed-llama"):
        model = build_model(name, device="meta")
        assert model.num_parameters() > 0


def test_llama3_8b_ffn_rule():
    spec = ModelSpec.parse(
        dict(
            vocab_size=128256, dim=4096, n_layers=1, n_heads=32, n_kv_heads=8, multiple_of=1024, ffn_dim_multiplier=1.3
        )
    )
    assert spec.ffn_hidden_size == 14336


def test_weight_memory_ordering():
    wb = spec_summary("llama3.2-1b")["weight_bytes"]
    assert wb["fp32"] == 2 * wb["bf16"] == 4 * 1_235_814_400
    assert wb["bf16"] > wb["int8"] > wb["nf4"]


@pytest.mark.parametrize(
    "change,needle",
    [
        ({"n_heads": 5}, "n_heads (5) must divide dim"),
        ({"n_kv_heads": 4}, "n_kv_heads (4) must divide n_heads"),
        ({"norm": "rmsnrom"}, "Did you mean 'rmsnorm'"),
        ({"activation": {"name": "swiglu", "params": {"bogus": 1}}}, "unknown params ['bogus']"),
        (
            {
                "rope_scaling": {
                    "name": "llama3",
                    "params": {"factor": 8, "low_freq_factor": 4, "high_freq_factor": 1, "original_max_positions": 128},
                }
            },
            "high_freq_factor",
        ),
        (
            {"rope_scaling": {"name": "llama3", "params": {"factor": 8, "original_max_positions": 100000}}},
            "original_max_positions",
        ),
        ({"colour": "red"}, "unknown field 'colour'"),
        ({"layer_overrides": [{"layers": "2-9", "activation": "relu"}]}, "n_layers=4"),
        ({"dim": -1}, "dim"),
        ({"head": {"name": "mlp"}, "tie_embeddings": True}, "tie_embeddings"),
    ],
)
def test_validation_messages_name_field_and_fix(change, needle):
    data = {**load_spec("tiny").to_dict(), **change}
    with pytest.raises(SpecError) as exc:
        ModelSpec.parse(data)
    assert needle in str(exc.value)


def test_layer_overrides_apply():
    spec = load_spec("tiny").with_updates(layer_overrides=[{"layers": "0-1", "activation": "relu", "ffn_hidden": 64}])
    model = build_model(spec)
    assert type(model.model.layers[0].mlp.act_fn).__name__ == "ReLU"
    assert model.model.layers[0].mlp.up_proj.out_features == 64
    assert type(model.model.layers[3].mlp.act_fn).__name__ == "SwiGLU"


def test_yaml_json_and_preset_files(tmp_path):
    spec = load_spec("tiny")
    spec.save(tmp_path / "s.yaml")
    spec.save(tmp_path / "s.json")
    assert load_spec(tmp_path / "s.yaml") == spec
    assert load_spec(tmp_path / "s.json") == spec
    (tmp_path / "p.yaml").write_text("preset: tiny\nn_layers: 2\n")
    assert load_spec(tmp_path / "p.yaml").n_layers == 2
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(SpecError, match="cannot parse"):
        load_spec(tmp_path / "bad.json")
    with pytest.raises(SpecError, match="Did you mean preset 'tiny'"):
        load_spec("tinny")


def test_string_shorthand_and_json_roundtrip():
    spec = load_spec("llama3.1-8b")
    again = ModelSpec.parse(json.loads(json.dumps(spec.to_dict())))
    assert again == spec


junk = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 10**6) | st.floats(allow_nan=True) | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
FIELDS = list(ModelSpec.model_fields)


@given(st.dictionaries(st.sampled_from([*FIELDS, "bogus"]), junk, max_size=6))
def test_invalid_specs_only_raise_spec_error(changes):
    data = {**load_spec("tiny").to_dict(), **changes}
    try:
        spec = ModelSpec.parse(data)
    except SpecError:
        return
    assert isinstance(spec, ModelSpec)


@given(specs())
def test_generated_specs_are_valid_and_roundtrip(spec):
    assert ModelSpec.parse(spec.to_dict()) == spec
