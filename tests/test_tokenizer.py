"""Tokenizers against their reference implementations (tiktoken, sentencepiece) and through a save/load cycle."""

from __future__ import annotations

import base64
import functools
import itertools
import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llamaforge.core.data import read_documents, tokenize_documents
from llamaforge.core.tokenizer import (
    LLAMA3_PATTERN,
    Tokenizer,
    is_tokenizer_dir,
    load_tokenizer,
    train_tokenizer,
)
from llamaforge.errors import LlamaforgeError, ModelFileError

LLAMA3 = "tokenizers/llama3/tokenizer.model"
LLAMA2 = "tokenizers/llama2/tokenizer.model"
TINY = "tinystories/valid.txt"
# Named specials from ../shared/data/README.md, in id order from 128000.
LLAMA3_NAMED = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
]
# Text that stresses byte-level and SentencePiece corner cases: whitespace runs, combining marks, astral planes,
# control characters, U+2581 itself, right-to-left text, special-token look-alikes.
AWKWARD = [
    "",
    " ",
    "   leading and trailing   ",
    "world  x\t\ttab\r\nwindows\n\n\nblank",
    "na\u0303o e\u0301 \u00e9 \u1e9b\u0323 \ufb01",
    "\U0001f600\U0001f468\u200d\U0001f469\u200d\U0001f467 \U00010348 \U0008b665",
    "\x00\x01\x1f\x7f\x9f",
    "\u2581already\u2581spaced \u2581",
    "\u0627\u0644\u0639\u0631\u0628\u064a\u0629 \u4e2d\u6587 \ud55c\uad6d\uc5b4 \u0939\u093f\u0928\u094d\u0926\u0940",
    "1234567890 3.14159 don'T I'LL WE'VE",
    "<|begin_of_text|> <s> </s> <PAD> <|eot_id|>",
]
unicode_text = st.text(st.characters(codec="utf-8"), max_size=80)


@functools.cache
def _load(path: str) -> Tokenizer:
    return load_tokenizer(path)


@functools.cache
def _tiktoken(path: str):
    tiktoken = pytest.importorskip("tiktoken")
    ranks = {}
    for line in Path(path).read_bytes().splitlines():
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
    return tiktoken.Encoding("llama3-reference", pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks, special_tokens={})


@functools.cache
def _sentencepiece(path: str):
    spm = pytest.importorskip("sentencepiece")
    return spm.SentencePieceProcessor(model_file=path)


@functools.cache
def _trained() -> Tokenizer:
    # Project-owned text (seeded pseudo-words): no shared data needed, so this runs everywhere.
    rng = random.Random(0)
    syllables = ["ka", "lo", "mi", "ren", "tu", "sha", "vor", "el", "qui", "don", "ba", "ne", "zu", "pry", "x"]
    words = ["".join(rng.choices(syllables, k=rng.randint(1, 4))) for _ in range(300)]
    texts = [" ".join(rng.choices(words, k=20)) + "." for _ in range(300)] + ["the cat sat on the mat"] * 5
    return train_tokenizer(texts, 600)


@pytest.fixture
def llama3(shared_data: Path) -> Tokenizer:
    return _load(str(shared_data / LLAMA3))


@pytest.fixture
def llama2(shared_data: Path) -> Tokenizer:
    return _load(str(shared_data / LLAMA2))


def _docs(shared_data: Path, n: int) -> list[str]:
    return list(itertools.islice(read_documents(shared_data / TINY), n))


# ----- Llama 3 ---------------------------------------------------------------------------------------------------
def test_llama3_meta_reference_ids(llama3: Tokenizer) -> None:
    assert llama3.encode("This is a test sentence.", bos=True, eos=True) == [
        128000,
        2028,
        374,
        264,
        1296,
        11914,
        13,
        128001,
    ]
    assert llama3.decode([128000, 2028, 374, 264, 1296, 11914, 13, 128001]) == "This is a test sentence."


def test_llama3_special_tokens(llama3: Tokenizer) -> None:
    assert llama3.vocab_size == 128_256
    assert (llama3.bos_id, llama3.eos_id, llama3.pad_id) == (128_000, 128_001, None)
    names = llama3.hf.convert_ids_to_tokens(list(range(128_000, 128_256)))
    assert names[: len(LLAMA3_NAMED)] == LLAMA3_NAMED
    assert len(set(names)) == 256 and all(n.startswith("<|") and n.endswith("|>") for n in names)
    # Parsed as control tokens when allowed (chat templates), as plain text when not (training data).
    assert llama3.encode("<|eot_id|>") == [128_009]
    as_text = llama3.encode("<|eot_id|>", allow_special=False)
    assert len(as_text) > 1 and max(as_text) < 128_000
    assert llama3.decode(as_text) == "<|eot_id|>"


def test_llama3_matches_tiktoken_on_stories(shared_data: Path, llama3: Tokenizer) -> None:
    reference = _tiktoken(str(shared_data / LLAMA3))
    docs = _docs(shared_data, 400) + AWKWARD
    ours = llama3.encode_batch(docs, allow_special=False)
    assert ours == [reference.encode_ordinary(d) for d in docs]
    assert sum(map(len, ours)) > 10_000  # the comparison covered real text


@settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=unicode_text)
def test_llama3_roundtrip_and_tiktoken_parity(shared_data: Path, text: str) -> None:
    tok = _load(str(shared_data / LLAMA3))
    ids = tok.encode(text, allow_special=False)
    assert ids == _tiktoken(str(shared_data / LLAMA3)).encode_ordinary(text)
    assert tok.decode(ids) == text


# ----- Llama 2 ---------------------------------------------------------------------------------------------------
def test_llama2_matches_sentencepiece_on_stories(shared_data: Path, llama2: Tokenizer) -> None:
    sp = _sentencepiece(str(shared_data / LLAMA2))
    docs = _docs(shared_data, 400) + AWKWARD
    ours = llama2.encode_batch(docs, allow_special=False)
    assert ours == sp.encode(docs)
    assert sum(map(len, ours)) > 10_000
    assert [llama2.decode(ids) for ids in ours[:400]] == sp.decode(ours[:400])


@settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    text=st.one_of(
        unicode_text,
        st.lists(st.sampled_from([" ", "  ", "\t", "\n", "x", "the", "\u00cf", "\u2581", "\U0001f600", "7"])).map(
            "".join
        ),
    )
)
def test_llama2_sentencepiece_parity_hypothesis(shared_data: Path, text: str) -> None:
    tok = _load(str(shared_data / LLAMA2))
    assert tok.encode(text, allow_special=False) == _sentencepiece(str(shared_data / LLAMA2)).encode(text)


def test_llama2_pad_token_is_explicit_and_never_packed(shared_data: Path, tmp_path: Path) -> None:
    # A fresh tokenizer (add_pad_token mutates), loaded from a directory holding only tokenizer.model.
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "tokenizer.model").write_bytes((shared_data / LLAMA2).read_bytes())
    assert is_tokenizer_dir(tmp_path / "src")
    tok = load_tokenizer(tmp_path / "src")
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (32_000, 1, 2, None)
    pad = tok.add_pad_token()
    assert (pad, tok.vocab_size, tok.pad_id) == (32_000, 32_001, 32_000)
    assert tok.add_pad_token() == pad and tok.vocab_size == 32_001  # idempotent
    docs = ["a story with <PAD> in it", "<PAD>", "and <s> fake </s> boundaries", *_docs(shared_data, 20)]
    stream = tokenize_documents(docs, tok)
    assert pad not in stream.tolist()
    n = len(docs)
    assert (stream == tok.bos_id).sum() == n and (stream == tok.eos_id).sum() == n
    # Saved and reloaded, the pad entry survives.
    tok.save(tmp_path / "out")
    again = load_tokenizer(tmp_path / "out")
    assert (again.vocab_size, again.pad_id) == (32_001, 32_000)
    assert again.encode_batch(docs) == tok.encode_batch(docs)
    assert tok.decode([5, pad, 6], skip_special=True) == tok.decode([5, 6], skip_special=True)


# ----- trained byte-level BPE ------------------------------------------------------------------------------------
def test_train_tokenizer_specials_and_size() -> None:
    tok = _trained()
    assert tok.vocab_size == 600
    ids = tok.encode("the cat sat", bos=True, eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and tok.pad_id is not None
    assert len({tok.bos_id, tok.eos_id, tok.pad_id}) == 3
    assert len(ids) < 2 + len("the cat sat")  # it learned merges, not just bytes
    assert tok.decode(ids) == "the cat sat"
    assert tok.decode(ids, skip_special=False).startswith(tok.hf.bos_token)


def test_train_tokenizer_is_deterministic_and_rejects_bad_sizes() -> None:
    texts = ["hello world", "hello there", "world peace"] * 20
    a, b = train_tokenizer(texts, 300), train_tokenizer(texts, 300)
    assert a.hf.get_vocab() == b.hf.get_vocab()
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(texts, 100)


@settings(max_examples=200)
@given(text=unicode_text)
def test_trained_bpe_roundtrip(text: str) -> None:
    tok = _trained()
    assert tok.decode(tok.encode(text, allow_special=False)) == text
    assert tok.decode(tok.encode(text, bos=True, eos=True, allow_special=False)) == text


def test_encode_batch_matches_encode() -> None:
    tok = _trained()
    texts = AWKWARD + ["the cat sat on a mat"] * 3
    assert tok.encode_batch(texts, bos=True) == [tok.encode(t, bos=True) for t in texts]
    assert tok.encode_batch([]) == []


# ----- save / load -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["trained", "llama2", "llama3"])
def test_save_then_autotokenizer_encodes_identically(which: str, shared_data: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tok = _trained() if which == "trained" else _load(str(shared_data / (LLAMA2 if which == "llama2" else LLAMA3)))
    tok.save(tmp_path)
    assert (tmp_path / "tokenizer.json").exists() and is_tokenizer_dir(tmp_path)
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    texts = AWKWARD + _docs(shared_data, 30)
    assert len(hf) == tok.vocab_size
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    for text in texts:
        assert hf.encode(text, add_special_tokens=False) == tok.encode(text)
    # Loaded the Hugging Face way, encoding adds BOS like Llama's tokenizers do.
    assert hf.encode("hi")[0] == tok.bos_id
    again = Tokenizer(hf)  # what load_tokenizer(tmp_path) returns
    assert again.encode_batch(texts, bos=True, eos=True) == tok.encode_batch(texts, bos=True, eos=True)
    assert [again.decode(ids) for ids in again.encode_batch(texts)] == [tok.decode(tok.encode(t)) for t in texts]


def test_load_tokenizer_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="does not exist"):
        load_tokenizer(tmp_path / "missing")
    assert not is_tokenizer_dir(tmp_path) and not is_tokenizer_dir(tmp_path / "missing")
    with pytest.raises(ModelFileError, match="no tokenizer"):
        load_tokenizer(tmp_path)
    junk = tmp_path / "tokenizer.model"
    junk.write_bytes(b"\x00\x01 definitely not a tokenizer")
    with pytest.raises(LlamaforgeError):
        load_tokenizer(junk)
    bad_tiktoken = tmp_path / "bad" / "tokenizer.model"
    bad_tiktoken.parent.mkdir()
    bad_tiktoken.write_text("IQ== 0\nIg== 1 extra\n")
    with pytest.raises(ModelFileError, match="expected 'base64-token rank'"):
        load_tokenizer(bad_tiktoken)


# ----- CLI -------------------------------------------------------------------------------------------------------
def test_cli_train_encode_decode(tmp_path: Path) -> None:
    import json

    from click.testing import CliRunner

    from llamaforge.cli import cli

    data = tmp_path / "corpus.jsonl"
    rng = random.Random(2)
    data.write_text(
        "\n".join(json.dumps({"text": " ".join(rng.choices(["ab", "cd", "efg", "h"], k=30))}) for _ in range(50))
    )
    runner = CliRunner()
    out = tmp_path / "tok"
    result = runner.invoke(
        cli, ["tokenizer", "train", "--data", str(data), "--vocab-size", "300", "--out", str(out), "--json"]
    )
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["documents"] == 50 and info["vocab_size"] == load_tokenizer(out).vocab_size
    assert info["chars_per_token"] > 1.0
    result = runner.invoke(cli, ["tokenizer", "encode", str(out), "ab cd efg", "--bos", "--json"])
    encoded = json.loads(result.output)
    tok = load_tokenizer(out)
    assert encoded["ids"] == tok.encode("ab cd efg", bos=True) and encoded["tokens"][0] == tok.hf.bos_token
    result = runner.invoke(cli, ["tokenizer", "decode", str(out), *map(str, encoded["ids"])])
    assert result.output.strip() == "ab cd efg"
    result = runner.invoke(cli, ["tokenizer", "train", "--data", str(tmp_path / "none.txt"), "--out", str(out)])
    assert result.exit_code == 2 and "does not exist" in result.output
    result = runner.invoke(cli, ["tokenizer", "decode", str(out), "99999"])
    assert result.exit_code == 2 and "outside the vocabulary" in result.output


def test_load_tokenizer_other_layouts(tmp_path: Path) -> None:
    from llamaforge.core.llama2c import Llama2cTokenizer

    # A tokenizer.json path loads its directory; a llama2.c tokenizer.bin (file or directory) loads through llama2c.
    tok = _trained()
    tok.save(tmp_path / "hf")
    assert load_tokenizer(tmp_path / "hf" / "tokenizer.json").encode("the cat") == tok.encode("the cat")
    pieces = [b"<unk>", b"\n<s>\n", b"\n</s>\n"] + [bytes([b]) for b in range(256)] + [b" c", b"at", b" cat"]
    Llama2cTokenizer(pieces, [0.0] * 259 + [-1.0, -2.0, -0.5]).save_bin(tmp_path / "l2c" / "tokenizer.bin")
    for path in (tmp_path / "l2c", tmp_path / "l2c" / "tokenizer.bin"):
        assert is_tokenizer_dir(tmp_path / "l2c")
        loaded = load_tokenizer(path)
        assert isinstance(loaded, Llama2cTokenizer) and len(loaded) == 262
    (tmp_path / "junk.bin").write_bytes(b"\xff" * 64)
    with pytest.raises(ModelFileError, match=r"not a llama2\.c"):
        load_tokenizer(tmp_path / "junk.bin")
