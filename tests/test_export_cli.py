"""`llamaforge export`: spec -> model -> export -> transformers (or the format's own reader) -> same logits."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from click.testing import CliRunner

from llamaforge import build_model, load_model, load_spec, save_model
from llamaforge.cli import cli
from llamaforge.core.llama2c import Llama2cConfig, Llama2cTokenizer, write_checkpoint
from llamaforge.core.tokenizer import train_tokenizer

transformers = pytest.importorskip("transformers")

CORPUS = [
    f"{who} {verb} the {thing} near the {place}."
    for who in ("Lily", "Tom", "the dog", "a bird")
    for verb in ("saw", "found", "liked", "took")
    for thing in ("ball", "apple", "red box", "tree")
    for place in ("park", "river", "house")
]


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def _train_briefly(model, steps=12):
    """A few AdamW steps on a repeating pattern: weights leave their initial distribution and loss drops."""
    g = torch.Generator().manual_seed(0)
    pattern = torch.randint(0, model.spec.vocab_size, (12,), generator=g)
    batch = pattern.repeat(1, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    model.train()
    for _ in range(steps):
        loss = model(batch[:, :-1], targets=batch[:, 1:]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], "the briefly trained model did not learn; the test would not exercise it"
    return model.eval()


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(CORPUS, vocab_size=300, min_frequency=1)


@pytest.mark.parametrize(
    "tie, scaling, trained",
    [(True, False, False), (False, True, False), (True, True, True), (False, False, True)],
)
def test_spec_to_hf_to_transformers_same_logits(tmp_path, tokenizer, tie, scaling, trained):
    updates = {"n_layers": 2, "vocab_size": tokenizer.vocab_size, "tie_embeddings": tie, "max_positions": 128}
    if scaling:
        updates |= {
            "rope_scaling": {
                "name": "llama3",
                "params": {"factor": 8.0, "high_freq_factor": 4.0, "original_max_positions": 16},
            },
            "rope_theta": 500000.0,
        }
    spec = load_spec("tiny").with_updates(**updates)
    model = build_model(spec, seed=1).eval()
    if trained:
        model = _train_briefly(model)
    save_model(model, tmp_path / "run")
    tokenizer.save(tmp_path / "run")
    result = run("export", tmp_path / "run", "--format", "hf", "--out", tmp_path / "hf", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    names = {f["path"] for f in report["files"]}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= names
    assert report["tokenizer"] is True
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["tie_word_embeddings"] == tie
    assert config["rope_theta"] == spec.rope_theta and config["rope_parameters"]["rope_theta"] == spec.rope_theta
    if scaling:
        assert config["rope_scaling"]["rope_type"] == "llama3" and config["rope_parameters"]["factor"] == 8.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
        hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "Tom found the red box near the river."
    ids = hf_tok(text, add_special_tokens=False)["input_ids"]
    assert ids == tokenizer.encode(text)
    batch = torch.tensor([ids * 8])  # 80+ positions: past original_max_positions, where llama3 scaling matters
    with torch.no_grad():
        torch.testing.assert_close(hf(batch).logits, model(batch).logits, atol=1e-4, rtol=1e-4)


def _toy_llama2c_tokenizer() -> Llama2cTokenizer:
    pieces = [b"<unk>", b"\n<s>\n", b"\n</s>\n"] + [f"<0x{b:02X}>".encode() for b in range(256)]
    extra = [b" ", b"a", b"b", b"c", b" a", b" b", b"ab", b" ab", b"ca", b" abc"]
    return Llama2cTokenizer(pieces + extra, [0.0] * len(pieces) + [-float(i) for i in range(len(extra))])


def test_llama2c_bin_exports_to_hf(tmp_path):
    tok = _toy_llama2c_tokenizer()
    cfg = Llama2cConfig(dim=32, hidden_dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tok.vocab_size,
                        seq_len=32, shared_classifier=False, version=1)  # fmt: skip
    g = torch.Generator().manual_seed(0)
    state = {n: torch.randn(*s, generator=g) * 0.3 for n, s in cfg.weight_shapes()}
    (tmp_path / "ckpt").mkdir()
    path = write_checkpoint(tmp_path / "ckpt" / "stories.bin", cfg, state)
    tok.save_bin(tmp_path / "tok.bin")
    # without a tokenizer beside the checkpoint the export has none; --tokenizer supplies it
    bare = json.loads(run("export", path, "--out", tmp_path / "bare", "--json").output)
    assert bare["tokenizer"] is False
    result = run("export", path, "--out", tmp_path / "hf", "--tokenizer", tmp_path / "tok.bin", "--json")
    assert result.exit_code == 0, result.output
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
        hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "abc ab ca  a b"
    ids = hf_tok(text)["input_ids"]
    assert ids == tok.encode_runc(text)
    assert hf_tok.decode(ids, skip_special_tokens=True) == text
    ours = load_model(path)
    x = torch.tensor([ids])
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, ours(x).logits, atol=1e-4, rtol=1e-4)
    gen = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert gen["eos_token_id"] == 1  # llama2.c's run stops at BOS
    # a tokenizer.bin beside the checkpoint is found without --tokenizer
    tok.save_bin(tmp_path / "ckpt" / "tokenizer.bin")
    again = json.loads(run("export", path, "--out", tmp_path / "hf2", "--json").output)
    assert again["tokenizer"] is True


def test_other_formats_and_options(tmp_path):
    spec = load_spec("tiny").with_updates(n_layers=1, vocab_size=128, tie_embeddings=False)
    model = build_model(spec, seed=0).eval()
    save_model(model, tmp_path / "run")
    ids = torch.randint(0, 128, (1, 9))
    with torch.no_grad():
        want = model(ids).logits
    r = run("export", tmp_path / "run", "--format", "llama2c", "--out", tmp_path / "l2c", "-o", "version=0", "--json")
    assert r.exit_code == 0, r.output
    r = run("export", tmp_path / "run", "--format", "meta", "--out", tmp_path / "meta", "-o", "shards=2", "--json")
    assert r.exit_code == 0, r.output
    r = run("export", tmp_path / "run", "--format", "hf", "--out", tmp_path / "hf", "-o", "max_shard_bytes=400000")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    for where in (tmp_path / "l2c" / "model.bin", tmp_path / "l2c", tmp_path / "meta", tmp_path / "hf"):
        with torch.no_grad():
            torch.testing.assert_close(load_model(where)(ids).logits, want, atol=1e-5, rtol=1e-5)


def test_export_errors_are_one_line(tmp_path):
    save_model(build_model(load_spec("tiny").with_updates(n_layers=1)), tmp_path / "run")
    r = run("export", tmp_path / "run", "--format", "hff", "--out", tmp_path / "x")
    assert r.exit_code == 2 and "error:" in r.output and "hf" in r.output
    r = run("export", tmp_path / "run", "--format", "hf", "--out", tmp_path / "x", "-o", "shards=2")
    assert r.exit_code == 2 and "no option(s) ['shards']" in r.output
    r = run("export", tmp_path / "run", "--format", "llama2c", "--out", tmp_path / "x", "--dtype", "bfloat16")
    assert r.exit_code == 2 and "dtype" in r.output
    r = run("export", tmp_path / "missing", "--out", tmp_path / "x")
    assert r.exit_code == 2 and "does not exist" in r.output


def test_registered_exporter_is_a_format(tmp_path):
    """Formats come from the exporter registry: a plugin's exporter is usable at once (as `peft` will be)."""
    import llamaforge
    from llamaforge.registry import registries

    class SpecOnly(llamaforge.Exporter):
        def export(self, model, out, *, tokenizer=None, note="", **options):
            out.mkdir(parents=True, exist_ok=True)
            model.spec.save(out / "spec.yaml")
            (out / "note.txt").write_text(note)
            return out

    snapshot = registries().snapshot()
    try:
        llamaforge.register("exporter", "spec_only", SpecOnly)
        save_model(build_model(load_spec("tiny").with_updates(n_layers=1)), tmp_path / "run")
        r = run("export", tmp_path / "run", "--format", "spec_only", "--out", tmp_path / "o", "-o", "note=hi")
        assert r.exit_code == 0, r.output
        assert (tmp_path / "o" / "note.txt").read_text() == "hi"
    finally:
        registries().restore(snapshot)
