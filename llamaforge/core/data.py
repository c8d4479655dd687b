"""Text sources, document splits and packing into fixed-length blocks.

Documents are wrapped in BOS/EOS and concatenated into one token stream which is cut into equal blocks: no padding
(the seed chapter padded every batch, and `<PAD>` became its most common token). The loader's position is part of
a checkpoint, so a resumed run sees exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llamaforge.errors import LlamaforgeError

TEXT_SUFFIXES = {".txt", ".text", ".md"}
JSONL_SUFFIXES = {".jsonl", ".json"}
PARQUET_SUFFIXES = {".parquet"}


class DataError(LlamaforgeError, ValueError):
    """A data source is missing, unreadable, of an unknown format, or yields nothing usable."""


def _split_text(text: str, separator: str) -> list[str]:
    if separator == "auto":
        separator = "blank" if "\n\n" in text else "line"
    if separator == "line":
        return text.split("\n")
    if separator == "blank":
        return text.split("\n\n")
    raise DataError(f"unknown separator {separator!r}; use 'auto', 'line' or 'blank'")


def _read_file(path: Path, text_field: str, separator: str) -> Iterator[str]:
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        yield from _split_text(path.read_text(encoding="utf-8", errors="replace"), separator)
    elif suffix in JSONL_SUFFIXES:
        with path.open(encoding="utf-8") as fh:
            head = fh.read(1)
            fh.seek(0)
            if suffix == ".json" and head == "[":
                records = json.load(fh)
            else:
                records = (json.loads(line) for line in fh if line.strip())
            for i, rec in enumerate(records):
                if not isinstance(rec, dict) or text_field not in rec:
                    raise DataError(f"{path}: record {i} has no {text_field!r} field (use --text-field)")
                yield str(rec[text_field])
    elif suffix in PARQUET_SUFFIXES:
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError("reading .parquet needs pyarrow: pip install 'llamaforge[data]'") from None
        table = pq.read_table(path, columns=[text_field])
        yield from (str(x) for x in table.column(text_field).to_pylist())
    else:
        raise DataError(f"{path}: unknown data format {suffix!r}; use .txt, .jsonl/.json or .parquet")


def read_documents(
    source: str | Path,
    *,
    text_field: str = "text",
    min_chars: int = 1,
    separator: str = "auto",
    split: str = "train",
) -> Iterator[str]:
    """Documents from a file, a directory of files, or a Hugging Face dataset id (streamed).

    Text files hold one document per line, or blank-line separated documents ('auto' picks blank lines when any
    exist). Records that are empty or shorter than `min_chars` after stripping are dropped.
    """
    path = Path(source)
    if path.exists():
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        if not files:
            raise DataError(f"data directory {path} is empty")
        raw: Iterable[str] = (doc for f in files for doc in _read_file(f, text_field, separator))
    elif "/" in str(source) and not str(source).startswith((".", "/")):
        raw = _hf_stream(str(source), text_field, split)
    else:
        raise DataError(f"data source {source} does not exist (give a file, a directory or a Hub dataset id)")
    for doc in raw:
        doc = doc.strip()
        if len(doc) >= max(1, min_chars):
            yield doc


def _hf_stream(name: str, text_field: str, split: str) -> Iterator[str]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"{name!r} looks like a Hub dataset id; streaming it needs `pip install datasets`") from None
    try:
        stream = datasets.load_dataset(name, split=split, streaming=True)
    except Exception as exc:
        raise DataError(f"cannot stream dataset {name!r}: {exc}") from None
    for rec in stream:
        yield str(rec[text_field])


def _doc_key(doc: str) -> int:
    return int.from_bytes(hashlib.blake2b(doc.encode("utf-8"), digest_size=8).digest(), "little")


def split_documents(docs: Iterable[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Deterministic train/validation split by a seeded hash of each document's text.

    Identical documents hash alike, so a duplicated document can never sit on both sides.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    threshold = int(val_fraction * 2**32)
    salt = seed.to_bytes(8, "little", signed=True)
    train: list[str] = []
    val: list[str] = []
    for doc in docs:
        h = hashlib.blake2b(doc.encode("utf-8"), digest_size=4, key=salt).digest()
        (val if int.from_bytes(h, "little") < threshold else train).append(doc)
    return train, val


def tokenize_documents(
    docs: Iterable[str], tokenizer: Any, *, bos: bool = True, eos: bool = True, batch: int = 512
) -> torch.Tensor:
    """One int64 stream: [BOS] doc [EOS] [BOS] doc [EOS] ... with no padding."""
    chunks: list[torch.Tensor] = []
    buf: list[str] = []

    def flush() -> None:
        for ids in tokenizer.encode_batch(buf, bos=bos, eos=eos):
            chunks.append(torch.tensor(ids, dtype=torch.int64))
        buf.clear()

    for doc in docs:
        buf.append(doc)
        if len(buf) >= batch:
            flush()
    if buf:
        flush()
    if not chunks:
        return torch.empty(0, dtype=torch.int64)
    return torch.cat(chunks)


class BlockLoader:
    """Infinite (inputs, targets) batches of packed blocks, shuffled per epoch from (seed, epoch).

    A block is seq_len + 1 consecutive tokens; inputs are its first seq_len, targets its last seq_len. With
    `world_size > 1` each rank reads a disjoint, equal share of every epoch's blocks.
    """

    def __init__(
        self,
        tokens: torch.Tensor,
        *,
        batch_size: int,
        seq_len: int,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = True,
    ) -> None:
        if tokens.dim() != 1:
            raise DataError("BlockLoader takes a 1-D token stream")
        if batch_size < 1 or seq_len < 1:
            raise DataError("batch_size and seq_len must be positive")
        self.tokens = tokens
        self.batch_size, self.seq_len = batch_size, seq_len
        self.seed, self.shuffle = seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.drop_last = drop_last
        n_blocks = (tokens.numel() - 1) // seq_len
        self._per_rank = n_blocks // world_size
        if self._per_rank < batch_size:
            raise DataError(
                f"not enough data: {tokens.numel():,} tokens make {n_blocks} blocks of {seq_len + 1} tokens, "
                f"{self._per_rank} per rank, fewer than one batch of {batch_size}; add data or lower "
                f"batch_size/seq_len"
            )
        self.epoch = 0
        self.position = 0  # batches already taken in this epoch

    def num_blocks(self) -> int:
        return self._per_rank * self.world_size

    def batches_per_epoch(self) -> int:
        return self._per_rank // self.batch_size

    def _order(self, epoch: int) -> list[int]:
        idx = list(range(self._per_rank * self.world_size))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + epoch).shuffle(idx)
        return idx[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            order = self._order(self.epoch)
            while self.position < self.batches_per_epoch():
                ids = order[self.position * self.batch_size : (self.position + 1) * self.batch_size]
                self.position += 1
                starts = torch.tensor(ids, dtype=torch.int64) * self.seq_len
                offsets = torch.arange(self.seq_len + 1)
                blocks = self.tokens[starts[:, None] + offsets[None, :]]
                yield blocks[:, :-1].contiguous(), blocks[:, 1:].contiguous()
            self.epoch += 1
            self.position = 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])


def eval_batches(
    tokens: torch.Tensor, *, batch_size: int, seq_len: int, max_batches: int | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Non-overlapping blocks in order (the last partial batch included), for deterministic evaluation."""
    n_blocks = (tokens.numel() - 1) // seq_len
    if n_blocks == 0:
        raise DataError(f"evaluation data has {tokens.numel()} tokens, fewer than one block of {seq_len + 1}")
    done = 0
    for start in range(0, n_blocks, batch_size):
        if max_batches is not None and done >= max_batches:
            return
        ids = torch.arange(start, min(start + batch_size, n_blocks)) * seq_len
        blocks = tokens[ids[:, None] + torch.arange(seq_len + 1)[None, :]]
        done += 1
        yield blocks[:, :-1].contiguous(), blocks[:, 1:].contiguous()


@dataclass
class DataBundle:
    train: torch.Tensor
    val: torch.Tensor
    n_train_docs: int
    n_val_docs: int


def prepare_data(
    source: str | Path | Iterable[str],
    tokenizer: Any,
    *,
    val_fraction: float = 0.05,
    seed: int = 0,
    val_source: str | Path | None = None,
    max_docs: int | None = None,
    text_field: str = "text",
) -> DataBundle:
    """Read, split (or take `val_source` as validation), tokenize and pack."""
    docs_iter = read_documents(source, text_field=text_field) if isinstance(source, str | Path) else iter(source)
    docs = []
    for doc in docs_iter:
        docs.append(doc)
        if max_docs is not None and len(docs) >= max_docs:
            break
    if not docs:
        raise DataError(f"no usable documents in {source}")
    if val_source is not None:
        train_docs = docs
        val_docs = list(read_documents(val_source, text_field=text_field))
        val_keys = {_doc_key(d) for d in val_docs}
        train_docs = [d for d in train_docs if _doc_key(d) not in val_keys]
    else:
        train_docs, val_docs = split_documents(docs, val_fraction, seed)
    if not val_docs:
        raise DataError("the validation split is empty: raise val_fraction or give validation data")
    return DataBundle(
        train=tokenize_documents(train_docs, tokenizer),
        val=tokenize_documents(val_docs, tokenizer),
        n_train_docs=len(train_docs),
        n_val_docs=len(val_docs),
    )
