"""llama2.c checkpoints and tokenizer.bin.

There is no llama2.c source or checkpoint here, so the test carries its own reference: a direct numpy transcription
of run.c's forward pass (float32, one token at a time, interleaved RoPE computed per position exactly as run.c does,
its KV cache, its greedy `generate` loop that stops at BOS) reading the raw file with its own parser. Checkpoints
are random weights written in llama2.c's layouts; llamaforge must load them (permuting q/k to rotate_half) and
generate the same tokens with the same logits.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llamaforge import ModelFileError, build_model, load_model
from llamaforge.core.llama2c import (
    MAGIC,
    Llama2cConfig,
    Llama2cTokenizer,
    looks_like_checkpoint,
    read_checkpoint,
    read_header,
    write_checkpoint,
)
from llamaforge.registry import registries

# ----- the reference: run.c in numpy ------------------------------------------------------------------------------


class RunC:
    """run.c's Transformer: memory_map_weights + forward + generate (greedy), float32 throughout."""

    def __init__(self, path):
        raw = open(path, "rb").read()
        if struct.unpack_from("<I", raw, 0)[0] == MAGIC:
            _, dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = struct.unpack_from("<i7i", raw, 4)
            shared, offset, v1 = bool(raw[36]), 256, True
        else:
            dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = struct.unpack_from("<7i", raw, 0)
            shared, vocab, offset, v1 = vocab > 0, abs(vocab), 28, False
        self.dim, self.hidden, self.n_layers, self.n_heads, self.n_kv = dim, hidden, n_layers, n_heads, n_kv
        self.vocab, self.seq_len = vocab, seq_len
        hs = dim // n_heads
        kv_dim = dim * n_kv // n_heads
        f = np.frombuffer(raw, dtype="<f4", offset=offset)
        ptr = 0

        def take(*shape):
            nonlocal ptr
            n = int(np.prod(shape))
            out = f[ptr : ptr + n].reshape(shape)
            ptr += n
            return out

        L = n_layers
        if not v1:  # run.c's memory_map_weights order
            self.emb = take(vocab, dim)
            self.rms_att = take(L, dim)
            self.wq, self.wk, self.wv = take(L, dim, dim), take(L, kv_dim, dim), take(L, kv_dim, dim)
            self.wo = take(L, dim, dim)
            self.rms_ffn = take(L, dim)
            self.w1, self.w2, self.w3 = take(L, hidden, dim), take(L, dim, hidden), take(L, hidden, dim)
            self.rms_final = take(dim)
            take(seq_len * hs // 2)  # freq_cis_real
            take(seq_len * hs // 2)  # freq_cis_imag
        else:  # export.py version1_export order
            self.rms_att, self.rms_ffn, self.rms_final = take(L, dim), take(L, dim), take(dim)
            self.emb = take(vocab, dim)
            self.wq, self.wk, self.wv = take(L, dim, dim), take(L, kv_dim, dim), take(L, kv_dim, dim)
            self.wo = take(L, dim, dim)
            self.w1, self.w2, self.w3 = take(L, hidden, dim), take(L, dim, hidden), take(L, hidden, dim)
        self.wcls = self.emb if shared else take(vocab, dim)
        assert ptr == f.size, "reference parser did not consume the whole file"
        self.key_cache = np.zeros((L, seq_len, kv_dim), np.float32)
        self.value_cache = np.zeros((L, seq_len, kv_dim), np.float32)

    @staticmethod
    def rmsnorm(x, w):
        ss = np.float32(np.sum(x * x, dtype=np.float32) / np.float32(x.size)) + np.float32(1e-5)
        return (w * (np.float32(1.0) / np.sqrt(ss)) * x).astype(np.float32)

    def forward(self, token, pos):
        dim, hs = self.dim, self.dim // self.n_heads
        kv_dim = self.dim * self.n_kv // self.n_heads
        kv_mul = self.n_heads // self.n_kv
        x = self.emb[token].copy()
        for layer in range(self.n_layers):
            xb = self.rmsnorm(x, self.rms_att[layer])
            q = self.wq[layer] @ xb
            k = self.wk[layer] @ xb
            v = self.wv[layer] @ xb
            for i in range(0, dim, 2):  # RoPE, interleaved pairs, frequency by position within the head
                head_dim = i % hs
                freq = np.float32(1.0) / np.power(np.float32(10000.0), np.float32(head_dim) / np.float32(hs))
                val = np.float32(pos) * freq
                fcr, fci = np.cos(val, dtype=np.float32), np.sin(val, dtype=np.float32)
                for vec in (q, k) if i < kv_dim else (q,):
                    v0, v1 = vec[i], vec[i + 1]
                    vec[i] = v0 * fcr - v1 * fci
                    vec[i + 1] = v0 * fci + v1 * fcr
            self.key_cache[layer, pos] = k
            self.value_cache[layer, pos] = v
            out = np.zeros(dim, np.float32)
            for h in range(self.n_heads):
                qh = q[h * hs : (h + 1) * hs]
                kh = self.key_cache[layer, : pos + 1, (h // kv_mul) * hs : (h // kv_mul + 1) * hs]
                att = (kh @ qh) / np.sqrt(np.float32(hs))
                att = np.exp(att - att.max())
                att = att / att.sum()
                vh = self.value_cache[layer, : pos + 1, (h // kv_mul) * hs : (h // kv_mul + 1) * hs]
                out[h * hs : (h + 1) * hs] = att @ vh
            x = x + self.wo[layer] @ out
            xb = self.rmsnorm(x, self.rms_ffn[layer])
            hb, hb2 = self.w1[layer] @ xb, self.w3[layer] @ xb
            hb = hb * (np.float32(1.0) / (np.float32(1.0) + np.exp(-hb))) * hb2
            x = x + self.w2[layer] @ hb
        x = self.rmsnorm(x, self.rms_final)
        return self.wcls @ x

    def generate(self, prompt, steps=None):
        """run.c generate() with temperature 0: returns the printed tokens and the logits of every forward."""
        steps = self.seq_len if not steps or steps > self.seq_len else steps
        token, pos, out, all_logits = prompt[0], 0, [], []
        while pos < steps:
            logits = self.forward(token, pos)
            all_logits.append(logits)
            nxt = prompt[pos + 1] if pos < len(prompt) - 1 else int(np.argmax(logits))
            pos += 1
            if nxt == 1:
                break
            if pos >= len(prompt):
                out.append(nxt)
            token = nxt
        return out, np.stack(all_logits)


def lf_greedy(model, prompt, steps):
    """Greedy decoding through llamaforge's KV cache, with run.c's stopping rules (BOS ends, `steps` forwards)."""
    with torch.no_grad():
        cache = model.new_cache(1, steps)
        ids = torch.tensor([prompt])
        logits = model(ids, cache=cache, cache_position=torch.arange(len(prompt))).logits[0]
        all_logits, out, pos = [logits], [], len(prompt)
        last = logits[-1]
        while True:
            nxt = int(last.argmax())
            if nxt == 1:
                break
            out.append(nxt)
            if pos >= steps:
                break
            last = model(torch.tensor([[nxt]]), cache=cache, cache_position=torch.tensor([pos])).logits[0, -1]
            all_logits.append(last[None])
            pos += 1
    return out, torch.cat(all_logits).numpy()


# ----- random checkpoints in llama2.c's layout ---------------------------------------------------------------------


def random_state(cfg: Llama2cConfig, seed: int) -> dict[str, np.ndarray]:
    """Meta-named weights with enough spread that greedy choices are far from ties."""
    rng = np.random.default_rng(seed)
    state = {}
    for name, shape in cfg.weight_shapes():
        if name.startswith("freq_cis"):
            continue
        if name.endswith("norm.weight"):
            state[name] = rng.normal(1.0, 0.2, shape).astype(np.float32)
        elif name == "tok_embeddings.weight":
            state[name] = rng.normal(0.0, 1.0, shape).astype(np.float32)
        else:
            state[name] = rng.normal(0.0, 1.5 / np.sqrt(shape[1]), shape).astype(np.float32)
    return state


CONFIGS = [
    Llama2cConfig(dim=32, hidden_dim=48, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=67, seq_len=24),
    Llama2cConfig(dim=48, hidden_dim=80, n_layers=2, n_heads=6, n_kv_heads=2, vocab_size=91, seq_len=20),
]


@pytest.mark.parametrize("version", [0, 1])
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("cfg_index", [0, 1])
def test_loaded_checkpoint_generates_what_run_c_generates(tmp_path, version, shared, cfg_index):
    cfg = Llama2cConfig(**{**CONFIGS[cfg_index].__dict__, "shared_classifier": shared, "version": version})
    path = write_checkpoint(tmp_path / "model.bin", cfg, random_state(cfg, seed=cfg_index * 4 + version * 2 + shared))
    model = load_model(path)
    assert model.spec.tie_embeddings == shared and model.spec.kv_heads == cfg.n_kv_heads
    ref = RunC(path)
    prompt = [1, 5, 17, 3]
    want_tokens, want_logits = ref.generate(prompt)
    got_tokens, got_logits = lf_greedy(model, prompt, cfg.seq_len)
    assert len(want_tokens) > 3, "the reference stopped at once; the test would not compare much"
    assert got_tokens == want_tokens
    np.testing.assert_allclose(got_logits, want_logits, atol=2e-4, rtol=1e-4)


def test_generate_api_matches_run_c(tmp_path):
    """llamaforge's own generation loop (static cache, greedy pipeline) gives run.c's tokens; run.c stops at BOS,
    which the imported spec declares as its EOS."""
    from llamaforge.core.generation import GenerationConfig, generate

    cfg = Llama2cConfig(**{**CONFIGS[1].__dict__, "version": 1})
    path = write_checkpoint(tmp_path / "model.bin", cfg, random_state(cfg, seed=11))
    model = load_model(path)
    assert model.spec.eos_token_id == 1
    prompt = [1, 40, 2, 7]
    want, _ = RunC(path).generate(prompt)
    assert len(want) > 3
    room = cfg.seq_len - len(prompt)
    got = generate(model, [prompt], GenerationConfig.from_options(max_new_tokens=room))[0]
    if got and got[-1] == 1:
        got = got[:-1]  # run.c does not print the BOS that stops it
    assert got == want[:room]


@settings(max_examples=10, deadline=None)
@given(
    heads=st.sampled_from([(1, 1), (2, 1), (2, 2), (4, 2)]),
    head_size=st.sampled_from([2, 4, 8]),
    hidden=st.integers(1, 40),
    n_layers=st.integers(1, 3),
    vocab=st.integers(1, 50),
    seq_len=st.integers(1, 16),
    shared=st.booleans(),
    version=st.sampled_from([0, 1]),
)
def test_writer_and_reader_round_trip(tmp_path_factory, heads, head_size, hidden, n_layers, vocab, seq_len, shared,
                                      version):  # fmt: skip
    n_heads, n_kv = heads
    cfg = Llama2cConfig(n_heads * head_size, hidden, n_layers, n_heads, n_kv, vocab, seq_len, shared, version)
    state = random_state(cfg, seed=0)
    path = write_checkpoint(tmp_path_factory.mktemp("rt") / "m.bin", cfg, state)
    assert path.stat().st_size == cfg.file_bytes()
    assert read_header(path) == cfg
    assert looks_like_checkpoint(path)
    again, tensors = read_checkpoint(path)
    assert again == cfg
    assert set(tensors) == set(state)
    for name, value in state.items():
        np.testing.assert_array_equal(tensors[name].numpy(), value)


@pytest.mark.parametrize("version", [0, 1])
@pytest.mark.parametrize("tie", [True, False])
def test_export_then_reference_and_reload(tmp_path, version, tie):
    spec = {
        "vocab_size": 80,
        "dim": 32,
        "n_layers": 2,
        "n_heads": 4,
        "n_kv_heads": 2,
        "ffn_hidden": 40,
        "rope_theta": 10000.0,
        "norm_eps": 1e-5,
        "max_positions": 16,
        "tie_embeddings": tie,
        "init_std": 0.3,
    }
    model = build_model(spec, seed=3).eval()
    exporter = registries().exporter.get("llama2c")()
    path = exporter.export(model, tmp_path / "out", version=version)
    assert path.name == "model.bin" and read_header(path).version == version
    ids = [1, 9, 33, 2, 50, 7]
    ref = RunC(path)
    ref_logits = np.stack([ref.forward(t, p) for p, t in enumerate(ids)])
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0].numpy()
        again = load_model(path)(torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(ours, ref_logits, atol=2e-4, rtol=1e-4)
    np.testing.assert_allclose(again, ours, atol=1e-5, rtol=1e-5)


def test_unexpressible_models_are_refused(tmp_path):
    from llamaforge import SpecError
    from llamaforge.core.llama2c import save_llama2c

    spec = {"vocab_size": 40, "dim": 16, "n_layers": 1, "n_heads": 2, "rope_theta": 10000.0}
    with pytest.raises(SpecError, match="rope_theta"):
        save_llama2c(build_model({**spec, "rope_theta": 500000.0}), tmp_path / "x.bin")
    with pytest.raises(SpecError, match="norm_eps"):
        save_llama2c(build_model({**spec, "norm_eps": 1e-6}), tmp_path / "x.bin")
    with pytest.raises(SpecError, match="norm=layernorm"):
        save_llama2c(build_model({**spec, "norm": "layernorm"}), tmp_path / "y.bin")
    assert not (tmp_path / "x.bin").exists() and not (tmp_path / "y.bin").exists()


def test_bad_files_fail_clearly(tmp_path):
    cfg = CONFIGS[0]
    path = write_checkpoint(tmp_path / "m.bin", cfg, random_state(cfg, 0))
    truncated = tmp_path / "t.bin"
    truncated.write_bytes(path.read_bytes()[:-8])
    assert not looks_like_checkpoint(truncated)
    with pytest.raises(ModelFileError, match="no importer"):
        load_model(truncated)
    with pytest.raises(ModelFileError, match="truncated"):
        read_checkpoint(truncated)
    v2 = tmp_path / "q.bin"
    v2.write_bytes(struct.pack("<Ii", MAGIC, 2) + b"\0" * 300)
    with pytest.raises(ModelFileError, match="version 2"):
        read_header(v2)
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\xff" * 100)
    assert not looks_like_checkpoint(junk)


# ----- tokenizer.bin -----------------------------------------------------------------------------------------------


def _toy_tokenizer() -> Llama2cTokenizer:
    """A small SentencePiece-style vocabulary: specials, 256 byte pieces, characters, then merges by score."""
    pieces = [b"<unk>", b"\n<s>\n", b"\n</s>\n"] + [f"<0x{b:02X}>".encode() for b in range(256)]
    scores = [0.0] * len(pieces)
    singles = [c.encode() for c in " abcdeé"]
    merged = [b" a", b"ab", b" ab", b"cd", b"abcd", b" abcd", b"  ", b"ee", b"e\xc3\xa9", b"ba", b" b"]
    for i, p in enumerate(singles + merged):
        pieces.append(p)
        scores.append(-float(i) if p in merged else -1000.0 - i)
    return Llama2cTokenizer(pieces, scores)


@settings(max_examples=80, deadline=None)
@given(st.text(alphabet=st.sampled_from(list(" abcdeéxz\n世")), max_size=30))
def test_fast_tokenizer_encodes_like_run_c(text):
    tok = TOY
    assert tok.encode(text, bos=True) == tok.encode_runc(text, bos=True)
    assert tok.decode(tok.encode(text)) == text


TOY = _toy_tokenizer()


def test_tokenizer_bin_round_trip(tmp_path):
    path = TOY.save_bin(tmp_path / "tokenizer.bin")
    again = Llama2cTokenizer.load(path)
    assert again.pieces == TOY.pieces and again.max_token_length == TOY.max_token_length
    assert again.scores == [struct.unpack("<f", struct.pack("<f", s))[0] for s in TOY.scores]
    assert Llama2cTokenizer.looks_like(path)
    assert not looks_like_checkpoint(path)  # a tokenizer is never mistaken for a model
    with pytest.raises(ModelFileError, match="needs 9999"):
        Llama2cTokenizer.load(path, vocab_size=9999)


@pytest.fixture(scope="module")
def llama2_tokenizer():
    shared = Path(__file__).resolve().parents[1].parent / "shared" / "data"  # as conftest's shared_data fixture
    model = shared / "tokenizers" / "llama2" / "tokenizer.model"
    if not model.exists():
        pytest.skip(f"shared test data not found at {model}")
    pytest.importorskip("sentencepiece")
    return Llama2cTokenizer.from_sentencepiece(model), model


def test_llama2_tokenizer_bin_agrees_with_sentencepiece(llama2_tokenizer, shared_data, tmp_path):
    """llama2.c's tokenizer.bin for Llama 2, written as its tokenizer.py does, encodes TinyStories exactly like
    SentencePiece, both with run.c's algorithm and through the fast tokenizer, and survives a save/load."""
    import sentencepiece as spm

    tok, model_file = llama2_tokenizer
    tok = Llama2cTokenizer.load(tok.save_bin(tmp_path / "tokenizer.bin"))
    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    lines = [ln for ln in (shared_data / "tinystories" / "valid.txt").read_text().splitlines() if ln.strip()][:120]
    for line in lines:
        want = [1, *sp.encode(line)]
        assert tok.encode_runc(line) == want
        assert tok.encode(line, bos=True) == want
        assert tok.decode(want) == line
    assert tok.vocab_size == 32000 and tok.bos_id == 1 and tok.eos_id == 2


def test_run_c_decode_rules():
    tok = TOY
    space_a = tok.encode_runc("a", bos=False)[0]
    assert tok.piece_bytes(1, space_a) == b"a"  # leading space dropped right after BOS
    assert tok.piece_bytes(5, space_a) == b" a"
    assert tok.piece_bytes(None, 3 + 0x41) == b"A"  # <0x41> is the byte itself
