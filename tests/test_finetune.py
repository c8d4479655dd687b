"""Fine-tuning data and adapter training: response-only loss, domain adaptation, instruction tuning, QLoRA."""

from __future__ import annotations

import contextlib
import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from llamaforge.core import finetune as ft
from llamaforge.core.model import build_model
from llamaforge.core.spec import load_spec


class CharTokenizer:
    """One id per character (plus BOS/EOS/pad): token boundaries are obvious, so masks can be checked exactly."""

    bos_id, eos_id, pad_id = 0, 1, 2

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        return [self.bos_id] * bos + [3 + (ord(c) % 200) for c in text] + [self.eos_id] * eos


text_st = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), min_size=1, max_size=40)


@settings(max_examples=40)
@given(prompt=text_st, response=text_st, max_len=st.integers(2, 90))
def test_loss_mask_covers_exactly_the_response_tokens(prompt, response, max_len):
    tok = CharTokenizer()
    ex = ft.encode_instruction(tok, prompt, response, max_len)
    full = tok.encode(prompt, bos=True) + tok.encode(response, eos=True)
    n_prompt = len(prompt) + 1
    if max_len + 1 <= n_prompt:
        assert ex is None
        return
    assert ex is not None
    ids = full[: max_len + 1]
    assert ex.inputs.tolist() == ids[:-1]
    expected = [-100 if t + 1 < n_prompt else ids[t + 1] for t in range(len(ids) - 1)]
    assert ex.targets.tolist() == expected
    assert (ex.targets != -100).sum() == len(ids) - n_prompt  # every kept response token (and EOS) is a target


def test_collate_pads_inputs_and_ignores_padding_in_targets():
    tok = CharTokenizer()
    a = ft.encode_instruction(tok, "ab", "cdef", 64)
    b = ft.encode_instruction(tok, "abcdefg", "h", 64)
    inputs, targets = ft.collate([a, b], pad_id=tok.pad_id)
    assert inputs.shape == targets.shape == (2, max(a.inputs.numel(), b.inputs.numel()))
    assert inputs[1, b.inputs.numel() :].eq(tok.pad_id).all() or b.inputs.numel() == inputs.shape[1]
    assert targets[0, a.targets.numel() :].eq(-100).all()
    assert (targets != -100).sum() == (a.targets != -100).sum() + (b.targets != -100).sum()


def test_forward_loss_is_cross_entropy_over_response_tokens_only():
    tok = CharTokenizer()
    spec = load_spec("tiny").with_updates(vocab_size=203, dim=32, n_layers=1, n_heads=4, n_kv_heads=2)
    model = build_model(spec, seed=0).eval()
    examples = [
        ft.encode_instruction(tok, "Question: 2+2?\n", "Four.", 64),
        ft.encode_instruction(tok, "Hi\n", "Hello", 64),
    ]
    inputs, targets = ft.collate(examples, tok.pad_id)
    with torch.no_grad():
        logits = model(inputs).logits
        keep = targets != -100
        manual = F.cross_entropy(logits[keep], targets[keep])
        torch.testing.assert_close(model(inputs, targets).loss, manual, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model(inputs, targets, return_logits=False).loss, manual, atol=1e-5, rtol=1e-5)
        assert abs(ft.evaluate_examples(model, examples, pad_id=tok.pad_id) - float(manual)) < 1e-5


def test_alpaca_records_render_through_the_template(shared_data):
    records = ft.read_instructions(shared_data / "instruct" / "alpaca_en_demo.json")
    assert len(records) == 999
    with_input = next(r for r in records if r["input"])
    without = next(r for r in records if not r["input"])
    tmpl = ft.TEMPLATES["alpaca"]
    rendered = tmpl.render(with_input)
    assert "### Input:\n" + with_input["input"].strip() in rendered and rendered.endswith("### Response:\n")
    assert "### Input:" not in tmpl.render(without)
    assert with_input["output"] not in rendered


def test_bad_instruction_files_fail_with_a_reason(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"prompt": "x", "completion": "y"}]))
    with pytest.raises(ft.AdapterError, match="instruction"):
        ft.read_instructions(bad)


# ----- training on real text ------------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def _single_thread():
    with one_thread():
        yield


@contextlib.contextmanager
def one_thread():
    """Tiny models train faster on one thread than on two contended ones (the test machine is shared)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


SEQ = 32
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"  # as tests/conftest.py finds it


@pytest.fixture(scope="module")
def stories_base():
    """A tokenizer and a small model trained briefly on TinyStories, plus TinyStories/Shakespeare splits."""
    from llamaforge.core.data import BlockLoader, read_documents, tokenize_documents
    from llamaforge.core.tokenizer import train_tokenizer

    if not SHARED_DATA.exists():
        pytest.skip(f"shared test data not found at {SHARED_DATA}")
    stories = list(read_documents(SHARED_DATA / "tinystories" / "train.txt"))[:700]
    stories_val = list(read_documents(SHARED_DATA / "tinystories" / "valid.txt"))[:60]
    plays = list(read_documents(SHARED_DATA / "shakespeare" / "input.txt"))
    tok = train_tokenizer(stories[:300], 384)
    data = {
        "stories": tokenize_documents(stories, tok),
        "stories_val": tokenize_documents(stories_val, tok),
        "plays": tokenize_documents(plays[:1500], tok),
        "plays_val": tokenize_documents(plays[-300:], tok),
        "plays_docs": plays,
    }
    spec = load_spec("tiny").with_updates(
        vocab_size=tok.vocab_size, dim=48, n_layers=2, n_heads=4, n_kv_heads=2, max_positions=256, ffn_hidden=128
    )
    model = build_model(spec, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=4e-3)
    batches = iter(BlockLoader(data["stories"], batch_size=16, seq_len=SEQ, seed=0))
    model.train()
    with one_thread():
        for _ in range(120):
            inputs, targets = next(batches)
            model(inputs, targets, return_logits=False).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    return model.eval(), tok, data


def _loss(model, tokens) -> float:
    from llamaforge.core.train import evaluate

    return evaluate(model, tokens, batch_size=16, seq_len=SEQ, max_batches=8)["loss"]


def _plays(data, seed=0):
    from llamaforge.core.data import BlockLoader

    return iter(BlockLoader(data["plays"], batch_size=16, seq_len=SEQ, seed=seed))


def test_lora_on_shakespeare_adapts_and_removal_gives_back_the_stories_model(stories_base):
    base, _, data = stories_base
    model = copy.deepcopy(base)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    stories_before, plays_before = _loss(model, data["stories_val"]), _loss(model, data["plays_val"])
    ft.add_adapter(model, "lora", name="bard", rank=8, alpha=16, targets="attention,mlp", seed=0)
    config = ft.FinetuneConfig(steps=60, lr=5e-3, warmup_steps=5, device="cpu", log_every=20)
    with one_thread():
        result = ft.finetune(model, _plays(data), config, adapter="bard")
    plays_after = _loss(model, data["plays_val"])
    assert plays_after < plays_before - 0.1, (plays_before, plays_after, result.history)
    ft.remove_adapter(model, "bard")
    now = model.state_dict()
    assert set(now) == set(state) and all(torch.equal(now[k], state[k]) for k in state)
    assert _loss(model, data["stories_val"]) == stories_before


def test_qlora_on_an_nf4_base_lowers_the_loss(stories_base):
    from llamaforge.core.loading import apply_transform
    from llamaforge.errors import LlamaforgeError

    base, _, data = stories_base
    model = copy.deepcopy(base)
    try:
        apply_transform(model, "quantizer", "nf4")
    except LlamaforgeError as exc:  # no bitsandbytes / no nf4 quantizer on this machine
        pytest.skip(f"nf4 quantizer unavailable: {exc}")
    quantized = {k: v.clone() for k, v in model.state_dict().items()}
    before = _loss(model, data["plays_val"])
    ft.add_adapter(model, "lora", rank=8, alpha=16, targets="attention,mlp", seed=0)
    config = ft.FinetuneConfig(steps=50, lr=5e-3, warmup_steps=5, device="cpu", log_every=10)
    with one_thread():
        result = ft.finetune(model, _plays(data, seed=1), config)
    after = _loss(model, data["plays_val"])
    assert after < before - 0.1, (before, after)
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in quantized.items()), "the quantized base must stay frozen"
    assert all(".lora_" in n for n, p in model.named_parameters() if p.requires_grad)


def test_train_lora_on_text_and_instructions_writes_loadable_adapters(stories_base, tmp_path, shared_data):
    base, tok, data = stories_base
    text = tmp_path / "plays.txt"
    text.write_text("\n\n".join(data["plays_docs"][:900]), encoding="utf-8")
    config = ft.FinetuneConfig(
        steps=30, lr=5e-3, batch_size=8, seq_len=SEQ, warmup_steps=3, eval_every=30, log_every=10
    )
    model = copy.deepcopy(base)
    with one_thread():
        result = ft.train_lora(
            model, tok, text, tmp_path / "text_adapter", rank=4, targets="q_proj,v_proj", config=config
        )
    assert result.val_loss < result.val_loss_before
    saved = json.loads((tmp_path / "text_adapter" / ft.ADAPTER_CONFIG).read_text())
    assert saved["type"] == "lora" and saved["params"]["rank"] == 4 and saved["training"]["format"] == "text"
    reloaded = ft.load_adapter(copy.deepcopy(base), tmp_path / "text_adapter")
    ids = data["plays_val"][:SEQ].unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, atol=1e-6, rtol=1e-6)

    records = ft.read_instructions(shared_data / "instruct" / "alpaca_en_demo.json")[:160]
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps(records), encoding="utf-8")
    config = ft.FinetuneConfig(
        steps=40, lr=5e-3, batch_size=8, seq_len=160, warmup_steps=3, eval_every=40, log_every=10
    )
    with one_thread():
        result = ft.train_lora(
            copy.deepcopy(base), tok, alpaca, tmp_path / "chat", targets="attention", val_fraction=0.1, config=config
        )
    assert result.val_loss < result.val_loss_before  # response-token loss on held-out instructions
    assert (tmp_path / "chat" / "metrics.jsonl").read_text().count("\n") == len(result.history)


def test_lora_cli_train_merge_export_import(stories_base, tmp_path):
    from click.testing import CliRunner

    from llamaforge.cli import cli
    from llamaforge.core.loading import load_model, save_model

    base, tok, data = stories_base
    save_model(base, tmp_path / "base")
    tok.save(tmp_path / "base")
    text = tmp_path / "plays.txt"
    text.write_text("\n\n".join(data["plays_docs"][:400]), encoding="utf-8")
    runner = CliRunner()

    def run(*args):
        result = runner.invoke(cli, [str(a) for a in args], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return json.loads(result.output) if "--json" in args else result.output

    trained = run("lora", "train", tmp_path / "base", "--data", text, "--out", tmp_path / "ad", "--steps", 6,
                  "--seq-len", SEQ, "--batch-size", 4, "--targets", "attention", "--rank", 2, "--device", "cpu",
                  "--json")  # fmt: skip
    assert trained["adapter_bytes"] < 100_000
    info = run("lora", "info", tmp_path / "ad", "--json")
    assert info["params"]["targets"] == ["q_proj", "k_proj", "v_proj", "o_proj"]

    run("lora", "merge", tmp_path / "base", tmp_path / "ad", "--out", tmp_path / "merged")
    adapted = ft.load_adapter(load_model(tmp_path / "base"), tmp_path / "ad")
    assert (
        trained["trainable_params"] == sum(p.numel() for p in ft.adapter_parameters(adapted)) == 1344
    )  # rank 2: q, o (48->48) 192 each, k, v (48->24) 144 each, two layers
    ids = data["plays_val"][:SEQ].unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(
            load_model(tmp_path / "merged")(ids).logits, adapted(ids).logits, atol=1e-4, rtol=1e-4
        )

    run("lora", "export-peft", tmp_path / "base", tmp_path / "ad", "--out", tmp_path / "peft",
        "--base-out", tmp_path / "hf")  # fmt: skip
    assert (tmp_path / "peft" / "adapter_config.json").exists() and (tmp_path / "hf" / "config.json").exists()
    run("lora", "import-peft", tmp_path / "base", tmp_path / "peft", "--out", tmp_path / "back")
    back = ft.load_adapter(load_model(tmp_path / "base"), tmp_path / "back")
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, adapted(ids).logits, atol=0, rtol=0)

    plain = run("eval", tmp_path / "base", "--data", text, "--seq-len", SEQ, "--max-batches", 2, "--json")
    with_adapter = run("eval", tmp_path / "base", "--data", text, "--seq-len", SEQ, "--max-batches", 2,
                       "--adapter", tmp_path / "ad", "--json")  # fmt: skip
    assert with_adapter["loss"] != plain["loss"]

    bad = runner.invoke(cli, ["lora", "train", str(tmp_path / "base"), "--data", str(text), "--out",
                              str(tmp_path / "x"), "--targets", "qkv_proj", "--steps", "1"])  # fmt: skip
    assert bad.exit_code == 2 and "matches no module" in bad.output
