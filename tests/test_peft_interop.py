"""LoRA adapters to and from PEFT: outputs of llamaforge and transformers+PEFT agree within 1e-4 both ways."""

from __future__ import annotations

import json

import pytest
import torch

from llamaforge.core import finetune as ft
from llamaforge.core.model import build_model
from llamaforge.core.peft_interop import PEFT_CONFIG, PEFT_WEIGHTS, export_peft, import_peft
from llamaforge.core.spec import load_spec
from llamaforge.plugins.exporters import export_hf

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

SPEC = {"vocab_size": 96, "dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "max_positions": 32}


def _base(tie: bool = True, seed: int = 0):
    return build_model(load_spec("tiny").with_updates(**SPEC, tie_embeddings=tie), seed=seed).eval()


def _randomise(model, name: str, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ft.adapter_parameters(model, name):
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def _hf(base_dir):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32).eval()


IDS = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize(
    ("tie", "targets", "rslora", "rank", "alpha"),
    [
        (True, "q_proj,v_proj", False, 4, 8.0),
        (False, "attention,mlp,lm_head", True, 3, 5.0),
        (True, "model.layers.1.self_attn.o_proj,model.layers.0.mlp.up_proj,lm_head", False, 2, 1.0),
    ],
)
def test_exported_adapter_loads_into_peft_with_matching_outputs(tmp_path, tie, targets, rslora, rank, alpha):
    model = _base(tie)
    export_hf(model, tmp_path / "base")
    ft.add_adapter(model, "lora", name="task", rank=rank, alpha=alpha, targets=targets, rslora=rslora)
    _randomise(model, "task")
    export_peft(model, tmp_path / "peft", "task")

    config = json.loads((tmp_path / "peft" / PEFT_CONFIG).read_text())
    assert config["peft_type"] == "LORA" and config["r"] == rank and config["use_rslora"] == rslora
    peft_model = peft.PeftModel.from_pretrained(_hf(tmp_path / "base"), str(tmp_path / "peft")).eval()
    with torch.no_grad():
        ours = model(IDS).logits
        theirs = peft_model(input_ids=IDS).logits
        with ft.adapters_disabled(model):
            base_logits = model(IDS).logits
    assert (ours - base_logits).abs().max() > 1e-2, "the adapter must matter for this comparison to mean anything"
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)


def test_peft_adapter_imports_with_matching_outputs(tmp_path):
    model = _base(tie=False)
    export_hf(model, tmp_path / "base")
    hf = _hf(tmp_path / "base")
    lora_config = peft.LoraConfig(
        r=4, lora_alpha=12, target_modules=["k_proj", "up_proj", "o_proj"], use_rslora=True, init_lora_weights=False
    )
    peft_model = peft.get_peft_model(hf, lora_config).eval()
    peft_model.save_pretrained(str(tmp_path / "peft"))
    with torch.no_grad():
        theirs = peft_model(input_ids=IDS).logits
        plain = model(IDS).logits
    ft.load_adapter(model, tmp_path / "peft")  # load_adapter recognises a PEFT directory
    assert ft.adapter_names(model) == ["default"]
    with torch.no_grad():
        ours = model(IDS).logits
    assert (theirs - plain).abs().max() > 1e-2
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    assert not any(p.requires_grad for p in ft.adapter_parameters(model))


def test_round_trip_through_peft_keeps_tensors_bitwise(tmp_path):
    model = _base()
    ft.add_adapter(model, "lora", name="a", rank=2, alpha=4.0, targets="v_proj,gate_proj")
    _randomise(model, "a")
    before = {k: v.clone() for k, v in ft.adapter_state_dict(model, "a").items()}
    export_peft(model, tmp_path / "peft", "a")
    other = _base()
    import_peft(other, tmp_path / "peft", name="b")
    after = ft.adapter_state_dict(other, "b")
    assert set(after) == set(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    with torch.no_grad():
        torch.testing.assert_close(other(IDS).logits, model(IDS).logits, atol=0, rtol=0)


def _write_peft(path, config_updates, tensors):
    from safetensors.torch import save_file

    path.mkdir(parents=True)
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"], "bias": "none"}
    config.update(config_updates)
    (path / PEFT_CONFIG).write_text(json.dumps(config))
    save_file(tensors, str(path / PEFT_WEIGHTS))


def _pair(module: str, rank: int = 2, fin: int = 32, fout: int = 32) -> dict[str, torch.Tensor]:
    prefix = f"base_model.model.{module}"
    return {f"{prefix}.lora_A.weight": torch.randn(rank, fin), f"{prefix}.lora_B.weight": torch.randn(fout, rank)}


@pytest.mark.parametrize(
    ("config", "tensors", "message"),
    [
        ({"target_modules": ["query_key_value"]}, _pair("transformer.h.0.attn.query_key_value"), "does not have"),
        ({"target_modules": ["q_proj", "qkv"]}, _pair("model.layers.0.self_attn.q_proj"), "match no linear layer"),
        ({}, _pair("model.layers.7.self_attn.q_proj"), "does not have"),
        ({"r": 3}, _pair("model.layers.0.self_attn.q_proj", rank=3, fin=48), "shape"),
        ({"use_dora": True}, _pair("model.layers.0.self_attn.q_proj"), "DoRA"),
        ({"peft_type": "IA3"}, _pair("model.layers.0.self_attn.q_proj"), "only LORA"),
    ],
)
def test_wrong_peft_adapters_fail_loudly_and_leave_the_model_alone(tmp_path, config, tensors, message):
    model = _base()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _write_peft(tmp_path / "bad", config, tensors)
    with pytest.raises(ft.AdapterError, match=message):
        ft.load_adapter(model, tmp_path / "bad")
    assert ft.adapter_names(model) == []
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
