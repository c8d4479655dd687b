"""Data sources, splits, packing and loader resumption."""

from __future__ import annotations

import functools
import json
import random
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llamaforge.core.data import (
    BlockLoader,
    StreamingBlockLoader,
    eval_batches,
    in_validation,
    prepare_data,
    read_documents,
    split_documents,
    tokenize_documents,
)
from llamaforge.core.tokenizer import Tokenizer, train_tokenizer
from llamaforge.errors import DataError, LlamaforgeError


def _corpus(n: int = 200, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(1, 7))) for _ in range(200)]
    return [" ".join(rng.choices(words, k=rng.randint(3, 40))) + "." for _ in range(n)]


@functools.cache
def _tok() -> Tokenizer:
    return train_tokenizer(_corpus(300, seed=1), 400)


# ----- sources ---------------------------------------------------------------------------------------------------
def test_txt_one_document_per_line(tmp_path: Path) -> None:
    f = tmp_path / "a.txt"
    f.write_text("first doc\nsecond doc\n\nthird doc\n   \nfourth\n" + "".join(f"line {i}\n" for i in range(30)))
    # A couple of stray blank lines do not turn a one-per-line file into a few giant documents.
    docs = list(read_documents(f))
    assert docs[:4] == ["first doc", "second doc", "third doc", "fourth"] and len(docs) == 34
    assert list(read_documents(f, separator="line")) == docs


def test_txt_blank_line_separated(tmp_path: Path) -> None:
    f = tmp_path / "a.txt"
    f.write_bytes(b"para one\r\nstill one\r\n\r\npara two\r\n \r\n\r\npara three")
    assert list(read_documents(f)) == ["para one\nstill one", "para two", "para three"]
    assert list(read_documents(f, separator="line")) == ["para one", "still one", "para two", "para three"]


def test_filtering_drops_empty_and_short_records(tmp_path: Path) -> None:
    f = tmp_path / "a.jsonl"
    rows = [{"text": "  keep this one  "}, {"text": ""}, {"text": "   "}, {"text": None}, {"text": "tiny"}]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert list(read_documents(f)) == ["keep this one", "tiny"]
    assert list(read_documents(f, min_chars=5)) == ["keep this one"]


def test_jsonl_json_and_parquet_with_text_field(tmp_path: Path) -> None:
    rows = [{"body": f"document number {i}", "id": i} for i in range(5)]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "b.json").write_text(json.dumps(rows))
    expected = [r["body"] for r in rows]
    assert list(read_documents(tmp_path / "a.jsonl", text_field="body")) == expected
    assert list(read_documents(tmp_path / "b.json", text_field="body")) == expected
    with pytest.raises(DataError, match="'text'"):
        list(read_documents(tmp_path / "a.jsonl"))
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"body": [*expected, None, ""], "n": list(range(7))}), tmp_path / "c.parquet")
    assert list(read_documents(tmp_path / "c.parquet", text_field="body")) == expected
    with pytest.raises(DataError, match="no column 'text'"):
        list(read_documents(tmp_path / "c.parquet"))


def test_directory_reads_data_files_in_order(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("from b\n")
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "from a"}) + "\n")
    (tmp_path / "sub" / "c.txt").write_text("from c\n")
    (tmp_path / ".hidden.txt").write_text("hidden\n")
    (tmp_path / "notes.bin").write_bytes(b"\x00")
    assert list(read_documents(tmp_path)) == ["from a", "from b", "from c"]


def test_source_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        list(read_documents(tmp_path / "missing.txt"))
    with pytest.raises(DataError, match="does not exist"):
        list(read_documents("data/missing.jsonl"))  # a relative path, not mistaken for a Hub id
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unknown data format"):
        list(read_documents(tmp_path / "x.csv"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"no \.txt"):
        list(read_documents(tmp_path / "empty"))
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{broken\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2"):
        list(read_documents(tmp_path / "bad.jsonl"))
    with pytest.raises(DataError, match="separator"):
        list(read_documents(tmp_path / "bad.jsonl", separator="comma"))
    assert issubclass(DataError, LlamaforgeError)


def test_tinystories_sample_reads(shared_data: Path) -> None:
    docs = list(read_documents(shared_data / "tinystories" / "valid.txt"))
    assert len(docs) > 1000 and all(d == d.strip() and d for d in docs)
    assert not any("\n\n" in d for d in docs)


# ----- splits ----------------------------------------------------------------------------------------------------
@settings(max_examples=200)
@given(
    docs=st.lists(st.text(alphabet="abc", min_size=1, max_size=3), max_size=60),
    fraction=st.floats(0.0, 0.9),
    seed=st.integers(0, 2**32),
)
def test_split_is_disjoint_deterministic_and_complete(docs: list[str], fraction: float, seed: int) -> None:
    train, val = split_documents(docs, fraction, seed)
    assert not set(train) & set(val)
    assert set(train) | set(val) == set(docs)
    assert len(train) + len(val) == len(set(docs))  # duplicates dropped
    assert (train, val) == split_documents(docs, fraction, seed)
    assert (sorted(train), sorted(val)) == tuple(map(sorted, split_documents(reversed(docs), fraction, seed)))
    if fraction > 0 and len(set(docs)) >= 2:
        assert val and train
    # Order within each side is the input order.
    assert train == sorted(train, key=docs.index) and val == sorted(val, key=docs.index)


def test_split_fraction_and_seed() -> None:
    docs = _corpus(1000)
    _train, val = split_documents(docs, 0.1, seed=0)
    assert len(val) == round(0.1 * len(set(docs)))
    _, other = split_documents(docs, 0.1, seed=1)
    assert set(other) != set(val)
    with pytest.raises(DataError, match="val_fraction"):
        split_documents(docs, 1.0, 0)
    held = [d for d in docs if in_validation(d, 0.1, 0)]
    assert 50 < len(held) < 150  # the streaming test holds out about the fraction asked


# ----- tokenizing and packing ------------------------------------------------------------------------------------
def test_tokenize_documents_wraps_each_document() -> None:
    tok, docs = _tok(), _corpus(50)
    stream = tokenize_documents(docs, tok, batch=7)
    assert stream.dtype == torch.int64 and stream.dim() == 1
    expected = [i for d in docs for i in tok.encode(d, bos=True, eos=True)]
    assert stream.tolist() == expected
    assert (stream == tok.bos_id).sum() == len(docs) == (stream == tok.eos_id).sum()
    assert tok.pad_id not in stream.tolist()
    assert tokenize_documents([], tok).numel() == 0
    # Special-token strings inside a document are text, never control tokens.
    fake = tokenize_documents(["x <|end_of_text|> <|pad|> y"], tok)
    assert (fake == tok.eos_id).sum() == 1 and tok.pad_id not in fake.tolist()


def _stream(n: int = 1003) -> torch.Tensor:
    return torch.randint(0, 1000, (n,), generator=torch.Generator().manual_seed(0))


def test_packing_covers_the_stream_without_padding() -> None:
    tokens, seq = _stream(), 10
    loader = BlockLoader(tokens, batch_size=4, seq_len=seq, shuffle=False)
    it = iter(loader)
    batches = [next(it) for _ in range(loader.batches_per_epoch())]
    inputs = torch.cat([x.reshape(-1) for x, _ in batches])
    targets = torch.cat([y.reshape(-1) for _, y in batches])
    used = loader.batches_per_epoch() * 4 * seq
    assert torch.equal(inputs, tokens[:used]) and torch.equal(targets, tokens[1 : used + 1])
    assert loader.num_blocks() == (tokens.numel() - 1) // seq
    # Shuffled: the same blocks, each exactly once per epoch, in another order.
    shuffled = BlockLoader(tokens, batch_size=4, seq_len=seq, seed=3)
    it = iter(shuffled)
    rows = [tuple(r.tolist()) for _ in range(shuffled.batches_per_epoch()) for r in next(it)[0]]
    all_blocks = {tuple(tokens[i * seq : (i + 1) * seq].tolist()) for i in range(100)}
    assert len(rows) == 100 and set(rows) == all_blocks
    assert rows != [tuple(r.tolist()) for x, _ in batches for r in x]


def test_drop_last_false_keeps_the_partial_batch() -> None:
    tokens = _stream(101)  # 10 blocks of 10
    loader = BlockLoader(tokens, batch_size=4, seq_len=10, shuffle=False, drop_last=False)
    it = iter(loader)
    sizes = [next(it)[0].shape[0] for _ in range(4)]
    assert sizes == [4, 4, 2, 4] and len(loader) == 3


@settings(max_examples=25)
@given(stop=st.integers(0, 40), world=st.integers(1, 3), seed=st.integers(0, 100))
def test_resume_continues_with_the_identical_batches(stop: int, world: int, seed: int) -> None:
    tokens = _stream(700)
    make = functools.partial(BlockLoader, tokens, batch_size=3, seq_len=8, seed=seed, rank=world - 1, world_size=world)
    reference = iter(make())
    expected = [next(reference) for _ in range(stop + 12)]  # crosses epoch boundaries
    first = make()
    it = iter(first)
    for _ in range(stop):
        next(it)
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores
    resumed = make()
    resumed.load_state_dict(state)
    it = iter(resumed)
    for x, y in expected[stop:]:
        rx, ry = next(it)
        assert torch.equal(rx, x) and torch.equal(ry, y)


def test_ranks_read_disjoint_blocks_and_epochs_reshuffle() -> None:
    tokens, seq, world = torch.arange(1001), 10, 3  # distinct tokens: a block is identified by its first token
    starts: list[set[int]] = []
    for rank in range(world):
        loader = BlockLoader(tokens, batch_size=2, seq_len=seq, seed=5, rank=rank, world_size=world)
        it = iter(loader)
        epoch0 = [next(it)[0][:, 0] for _ in range(loader.batches_per_epoch())]
        epoch1 = [next(it)[0][:, 0] for _ in range(loader.batches_per_epoch())]
        starts.append({int(s) for b in epoch0 for s in b})
        assert set(torch.cat(epoch1).tolist()) == starts[-1] or world > 1
        assert torch.cat(epoch0).tolist() != torch.cat(epoch1).tolist()
    assert all(not (starts[a] & starts[b]) for a in range(world) for b in range(a + 1, world))
    assert len({len(s) for s in starts}) == 1 and all(s % seq == 0 for r in starts for s in r)


def test_loader_errors() -> None:
    with pytest.raises(DataError, match="not enough data"):
        BlockLoader(_stream(50), batch_size=8, seq_len=10)
    with pytest.raises(DataError, match="1-D"):
        BlockLoader(torch.zeros(4, 4, dtype=torch.long), batch_size=1, seq_len=2)
    with pytest.raises(DataError, match="rank"):
        BlockLoader(_stream(), batch_size=1, seq_len=2, rank=2, world_size=2)
    state = BlockLoader(_stream(), batch_size=2, seq_len=10, seed=1).state_dict()
    with pytest.raises(DataError, match="cannot resume"):
        BlockLoader(_stream(), batch_size=2, seq_len=10, seed=2).load_state_dict(state)
    with pytest.raises(DataError, match="cannot resume"):
        BlockLoader(_stream(500), batch_size=2, seq_len=10, seed=1).load_state_dict(state)


def test_eval_batches_in_order_without_overlap() -> None:
    tokens = _stream(95)  # 9 blocks of 10
    batches = list(eval_batches(tokens, batch_size=4, seq_len=10))
    assert [x.shape[0] for x, _ in batches] == [4, 4, 1]
    assert torch.equal(torch.cat([x.reshape(-1) for x, _ in batches]), tokens[:90])
    assert torch.equal(torch.cat([y.reshape(-1) for _, y in batches]), tokens[1:91])
    assert len(list(eval_batches(tokens, batch_size=4, seq_len=10, max_batches=2))) == 2
    with pytest.raises(DataError, match="fewer than one block"):
        list(eval_batches(tokens[:5], batch_size=1, seq_len=10))


# ----- prepare_data ----------------------------------------------------------------------------------------------
def test_prepare_data_split_and_val_source(tmp_path: Path) -> None:
    tok, docs = _tok(), _corpus(120)
    (tmp_path / "train.txt").write_text("\n".join(docs + docs[:10]))  # duplicates must not leak into validation
    bundle = prepare_data(tmp_path / "train.txt", tok, val_fraction=0.1, seed=0)
    assert (bundle.n_train_docs, bundle.n_val_docs) == (108, 12)
    assert (bundle.train == tok.bos_id).sum() == 108 and (bundle.val == tok.bos_id).sum() == 12
    assert bundle.train.dtype == torch.int64
    small = prepare_data(tmp_path / "train.txt", tok, max_docs=30)
    assert small.n_train_docs + small.n_val_docs == 30
    (tmp_path / "val.txt").write_text("\n".join([*docs[:5], "a held out story."]))
    held = prepare_data(tmp_path / "train.txt", tok, val_source=tmp_path / "val.txt")
    assert (held.n_train_docs, held.n_val_docs) == (115, 6)
    (tmp_path / "blank.txt").write_text("\n \n")
    with pytest.raises(DataError, match="no usable documents"):
        prepare_data(tmp_path / "blank.txt", tok)
    with pytest.raises(DataError, match="validation split is empty"):
        prepare_data(["only one document"], tok)


# ----- streaming -------------------------------------------------------------------------------------------------
def test_streaming_matches_in_memory_packing_and_resumes() -> None:
    tok, docs = _tok(), _corpus(80)
    stream = tokenize_documents(docs, tok)
    loader = StreamingBlockLoader(lambda: docs, tok, batch_size=2, seq_len=16, tokenize_batch=5)
    it = iter(loader)
    n = (stream.numel() - 1) // 16 // 2
    got = torch.cat([next(it)[0].reshape(-1) for _ in range(n)])
    assert torch.equal(got, stream[: n * 32])  # same blocks as BlockLoader's unshuffled order
    assert loader.epoch == 0

    make = functools.partial(
        StreamingBlockLoader, lambda: docs, tok, batch_size=2, seq_len=16, shuffle_buffer=5, tokenize_batch=3
    )
    reference = iter(make())
    expected = [next(reference)[0] for _ in range(3 * n)]  # three epochs
    for stop in (0, 1, n - 1, n, 2 * n + 1):
        first = make()
        it = iter(first)
        for _ in range(stop):
            next(it)
        resumed = make()
        resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
        it = iter(resumed)
        assert all(torch.equal(next(it)[0], x) for x in expected[stop:])


def test_streaming_ranks_and_validation_are_disjoint(tmp_path: Path) -> None:
    tok, docs = _tok(), _corpus(60)
    (tmp_path / "d.txt").write_text("\n".join(docs))
    seen = []
    for rank, split in [(0, "train"), (1, "train"), (0, "val")]:
        loader = StreamingBlockLoader(
            tmp_path / "d.txt", tok, batch_size=1, seq_len=8, rank=rank, world_size=2, val_fraction=0.3, split=split
        )
        it = iter(loader)
        tokens = []
        while loader.epoch == 0:
            tokens += next(it)[0].reshape(-1).tolist()
        seen.append(tokens)
    for (rank, split), tokens in zip([(0, "train"), (1, "train"), (0, "val")], seen, strict=True):
        wanted = {d for i, d in enumerate(docs) if i % 2 == rank and in_validation(d, 0.3, 0) == (split == "val")}
        text = tok.decode(tokens)
        found = {d for d in docs if d in text}
        assert found <= wanted and len(found) >= len(wanted) - 2  # the last document may straddle the epoch end
    with pytest.raises(DataError, match="none for rank"):
        next(iter(StreamingBlockLoader(lambda: [], tok, batch_size=1, seq_len=4)))
