"""`generate` and `eval` accept every MODEL form: llama2.c checkpoint files and --adapter directories."""

from __future__ import annotations

import json

import torch
from click.testing import CliRunner

import llamaforge as lf
from llamaforge.cli import cli
from llamaforge.core import finetune as ft
from llamaforge.core.generation import GenerationConfig, generate
from llamaforge.core.llama2c import save_llama2c


def _gen_ids(*args):
    result = CliRunner().invoke(cli, ["generate", *args, "--max-new-tokens", "6", "--greedy", "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)["token_ids"]


def _spec():
    return lf.ModelSpec.parse(
        dict(
            vocab_size=64,
            dim=32,
            n_layers=2,
            n_heads=4,
            ffn_hidden=48,
            max_positions=64,
            rope_theta=10000.0,
            norm_eps=1e-5,
        )
    )


def test_generate_reads_a_llama2c_checkpoint_file(tmp_path):
    model = lf.build_model(_spec(), seed=0).eval()
    path = save_llama2c(model, tmp_path / "model.bin")
    loaded = lf.load_model(path)
    expected = generate(loaded, [[3, 4, 5]], GenerationConfig(max_new_tokens=6))[0]
    assert _gen_ids(str(path), "--prompt-ids", "3,4,5") == expected
    with torch.no_grad():  # and the checkpoint holds the same network
        ids = torch.tensor([[3, 4, 5, 6]])
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)


def test_generate_applies_an_adapter(tmp_path):
    base = lf.build_model(_spec(), seed=0).eval()
    lf.save_model(base, tmp_path / "base")
    adapted = lf.load_model(tmp_path / "base")
    ft.add_adapter(adapted, "lora", name="default", rank=4, alpha=8, targets="q_proj,v_proj")
    with torch.no_grad():  # a non-zero B so the adapter changes outputs
        for name, p in adapted.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    ft.save_adapter(adapted, tmp_path / "adapter", "default")
    config = GenerationConfig(max_new_tokens=6, eos_token_ids=[])
    with_adapter = generate(adapted.eval(), [[3, 4, 5]], config)[0]
    without = generate(base, [[3, 4, 5]], config)[0]
    assert with_adapter != without
    assert (
        _gen_ids(str(tmp_path / "base"), "--prompt-ids", "3,4,5", "--adapter", str(tmp_path / "adapter"))
        == with_adapter
    )
    assert _gen_ids(str(tmp_path / "base"), "--prompt-ids", "3,4,5") == without
