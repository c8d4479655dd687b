"""Text sources, document splits and packing into fixed-length blocks.

Documents are wrapped in BOS/EOS and concatenated into one token stream which is cut into equal blocks: no padding
(the seed chapter padded every batch, and `<PAD>` became its most common token). The loader's position is part of
a checkpoint, so a resumed run sees exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llamaforge.errors import DataError

__all__ = [
    "BlockLoader",
    "DataBundle",
    "DataError",
    "StreamingBlockLoader",
    "eval_batches",
    "in_validation",
    "prepare_data",
    "read_documents",
    "split_documents",
    "tokenize_documents",
]

TEXT_SUFFIXES = {".txt", ".text", ".md"}
JSONL_SUFFIXES = {".jsonl", ".json"}
PARQUET_SUFFIXES = {".parquet"}
DATA_SUFFIXES = TEXT_SUFFIXES | JSONL_SUFFIXES | PARQUET_SUFFIXES
SEPARATORS = ("auto", "line", "blank")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_BLANK = re.compile(r"\n[ \t]*\n")


def _detect_separator(head: str) -> str:
    """'blank' when blank lines separate a real share of the lines, else 'line'.

    A stray blank line or a trailing one in a one-document-per-line file must not merge the whole file into a few
    huge documents, so blank lines have to make up at least a tenth of the non-blank lines.
    """
    n_lines = sum(1 for line in head.splitlines() if line.strip())
    n_blank = len(_BLANK.findall(head.strip("\n")))
    return "blank" if n_blank and n_blank >= 0.1 * n_lines else "line"


def _read_text(path: Path, separator: str) -> Iterator[str]:
    with path.open(encoding="utf-8", errors="replace") as fh:
        if separator == "auto":
            separator = _detect_separator(fh.read(1 << 20))
            fh.seek(0)
        if separator == "line":
            yield from fh
            return
        paragraph: list[str] = []
        for line in fh:
            if line.strip():
                paragraph.append(line)
            elif paragraph:
                yield "".join(paragraph)
                paragraph = []
        if paragraph:
            yield "".join(paragraph)


def _record_text(rec: Any, text_field: str, where: str) -> str:
    if not isinstance(rec, dict) or text_field not in rec:
        keys = sorted(rec) if isinstance(rec, dict) else type(rec).__name__
        raise DataError(f"{where} has no {text_field!r} field (it has {keys}); pass text_field=/--text-field")
    value = rec[text_field]
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: field {text_field!r} is {type(value).__name__}, not text")
    return value


def _read_jsonl(path: Path, text_field: str) -> Iterator[str]:
    with path.open(encoding="utf-8") as fh:
        head = fh.read(4096).lstrip()
        fh.seek(0)
        if head.startswith("["):  # a JSON array of records (e.g. Alpaca-style .json files)
            try:
                records = json.load(fh)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path} is not valid JSON: {exc}") from None
            for i, rec in enumerate(records):
                yield _record_text(rec, text_field, f"{path}: record {i}")
            return
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno} is not a JSON record: {exc}") from None
            yield _record_text(rec, text_field, f"{path}:{lineno}")


def _read_parquet(path: Path, text_field: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError("reading .parquet needs pyarrow: pip install 'llamaforge[data]'") from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:
        raise DataError(f"cannot read parquet file {path}: {exc}") from None
    if text_field not in pf.schema_arrow.names:
        raise DataError(f"{path} has no column {text_field!r} (it has {pf.schema_arrow.names}); pass text_field=")
    for batch in pf.iter_batches(columns=[text_field], batch_size=4096):
        for value in batch.column(0).to_pylist():
            yield "" if value is None else str(value)


def _read_file(path: Path, text_field: str, separator: str) -> Iterator[str]:
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        yield from _read_text(path, separator)
    elif suffix in JSONL_SUFFIXES:
        yield from _read_jsonl(path, text_field)
    elif suffix in PARQUET_SUFFIXES:
        yield from _read_parquet(path, text_field)
    else:
        raise DataError(f"{path}: unknown data format {suffix!r}; use .txt, .jsonl/.json or .parquet")


def _data_files(path: Path) -> list[Path]:
    """Data files under a directory in a stable order; hidden files and other suffixes are skipped."""
    files = sorted(
        p
        for p in path.rglob("*")
        if p.is_file()
        and p.suffix.lower() in DATA_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    if not files:
        raise DataError(f"data directory {path} has no .txt, .jsonl, .json or .parquet files")
    return files


def read_documents(
    source: str | Path,
    *,
    text_field: str = "text",
    min_chars: int = 1,
    separator: str = "auto",
    split: str = "train",
) -> Iterator[str]:
    """Documents from a file, a directory of files, or a Hugging Face dataset id (streamed).

    Text files hold one document per line, or blank-line separated documents; 'auto' picks blank lines when they
    separate at least a tenth of the lines in the first MiB. Records that are empty or shorter than `min_chars`
    after stripping are dropped (the seed chapter's minimal cleaning). Files are read lazily, so a large corpus can
    be streamed.
    """
    if separator not in SEPARATORS:
        raise DataError(f"unknown separator {separator!r}; use one of {', '.join(SEPARATORS)}")
    path = Path(source)
    if path.is_dir():
        files = _data_files(path)
        raw: Iterable[str] = (doc for f in files for doc in _read_file(f, text_field, separator))
    elif path.is_file():
        if path.suffix.lower() not in DATA_SUFFIXES:
            raise DataError(f"{path}: unknown data format {path.suffix!r}; use .txt, .jsonl/.json or .parquet")
        raw = _read_file(path, text_field, separator)
    elif _HUB_ID.fullmatch(str(source)) and path.suffix.lower() not in DATA_SUFFIXES:
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
    for i, rec in enumerate(stream):
        yield _record_text(rec, text_field, f"{name} record {i}")


def _doc_key(doc: str) -> bytes:
    return hashlib.blake2b(doc.encode("utf-8"), digest_size=16).digest()


def _seeded_hash(doc: str, seed: int) -> int:
    salt = (seed % 2**64).to_bytes(8, "little")
    return int.from_bytes(hashlib.blake2b(doc.encode("utf-8"), digest_size=8, key=salt).digest(), "little")


def in_validation(doc: str, val_fraction: float, seed: int) -> bool:
    """Streaming membership test: a document is in validation when its seeded hash falls below `val_fraction`.

    It needs no memory, so it suits sources too large to hold; identical documents always land on the same side.
    The in-memory `split_documents` is exact about the count instead.
    """
    return _seeded_hash(doc, seed) < val_fraction * 2**64


def split_documents(docs: Iterable[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Deterministic train/validation split; no text on both sides.

    Exact duplicates are dropped first (keyed by a hash of the text), so a repeated document cannot land on both
    sides. Validation is then the `round(val_fraction * n)` unique documents with the smallest seeded hashes (at
    least one, and never all, when val_fraction > 0): the split depends on the seed and the set of documents, not
    their order. Both lists keep the input order.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    seen: set[bytes] = set()
    unique: list[str] = []
    for doc in docs:
        key = _doc_key(doc)
        if key not in seen:
            seen.add(key)
            unique.append(doc)
    n_val = round(val_fraction * len(unique))
    if val_fraction > 0 and len(unique) >= 2:
        n_val = min(max(1, n_val), len(unique) - 1)
    order = sorted(range(len(unique)), key=lambda i: (_seeded_hash(unique[i], seed), i))
    val_idx = set(order[:n_val])
    train = [d for i, d in enumerate(unique) if i not in val_idx]
    val = [d for i, d in enumerate(unique) if i in val_idx]
    return train, val


def _encode_docs(tokenizer: Any, docs: list[str], bos: bool, eos: bool, allow_special: bool) -> list[list[int]]:
    try:
        return tokenizer.encode_batch(docs, bos=bos, eos=eos, allow_special=allow_special)
    except TypeError:  # a tokenizer without the allow_special switch (a third-party wrapper)
        return tokenizer.encode_batch(docs, bos=bos, eos=eos)


def tokenize_documents(
    docs: Iterable[str],
    tokenizer: Any,
    *,
    bos: bool = True,
    eos: bool = True,
    batch: int = 512,
    allow_special: bool = False,
) -> torch.Tensor:
    """One int64 stream: [BOS] doc [EOS] [BOS] doc [EOS] ... with no padding.

    Special-token strings inside documents are encoded as plain text (`allow_special=False`), so a document that
    happens to contain "<PAD>" or "<|end_of_text|>" cannot put pad or a fake boundary into the stream; the pad id
    is never in the stream, so it never contributes to a loss.
    """
    chunks: list[torch.Tensor] = []
    docs_iter = iter(docs)
    while buf := list(itertools.islice(docs_iter, batch)):
        encoded = _encode_docs(tokenizer, buf, bos, eos, allow_special)
        chunks.append(torch.tensor(list(itertools.chain.from_iterable(encoded)), dtype=torch.int64))
    if not chunks:
        return torch.empty(0, dtype=torch.int64)
    stream = torch.cat(chunks)
    pad = getattr(tokenizer, "pad_id", None)
    if pad is not None and pad not in (getattr(tokenizer, "bos_id", None), getattr(tokenizer, "eos_id", None)):
        stream = stream[stream != pad]
    return stream


class BlockLoader:
    """Infinite (inputs, targets) batches of packed blocks, shuffled per epoch from (seed, epoch).

    A block is seq_len + 1 consecutive tokens; inputs are its first seq_len, targets its last seq_len; block i
    starts at token i * seq_len, so consecutive blocks share one token and every token of the stream (but a tail
    shorter than a block) is a target exactly once per epoch. With `world_size > 1` each rank reads a disjoint,
    equal share of every epoch's blocks (the remainder is left out so all ranks take the same number of steps).
    `drop_last=False` ends each epoch with a smaller batch instead of skipping the blocks that do not fill one.
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
        self._stream_blocks = n_blocks
        self._per_rank = n_blocks // world_size
        if world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"rank must be in [0, world_size); got rank={rank}, world_size={world_size}")
        if self._per_rank < (batch_size if drop_last else 1):
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
        if self.drop_last:
            return self._per_rank // self.batch_size
        return -(-self._per_rank // self.batch_size)

    def __len__(self) -> int:
        return self.batches_per_epoch()

    def _order(self, epoch: int) -> list[int]:
        # Python's Random is stable across versions and platforms, so an order can be reproduced years later.
        # The permutation covers the whole stream whatever the rank count, and rank r takes every world_size-th
        # entry: global batch p is the same set of blocks for any split of batch_size x world_size.
        idx = list(range(self._stream_blocks))
        if self.shuffle:
            random.Random(f"llamaforge-blocks:{self.seed}:{epoch}").shuffle(idx)
        return idx[: self._per_rank * self.world_size][self.rank :: self.world_size]

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
        """Where the next batch comes from, plus what must match for a resume to see the same order."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "world_size": self.world_size,
            "num_blocks": self.num_blocks(),
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "shuffle": int(self.shuffle),
            "stream_blocks": self._stream_blocks,
            "blocks_consumed": self.position * self.batch_size * self.world_size,  # this epoch, all ranks
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue at the saved batch; refuses a state from a loader over other data or with other settings.

        A state written with another rank count or per-rank batch size continues at the same point of the
        epoch's global order (blocks consumed by all ranks) when that point is a whole number of the new global
        batches (batch_size x world_size); with an unchanged global batch the continuation is exact."""
        mine = self.state_dict()
        regrouped = "stream_blocks" in state and (
            int(state["world_size"]) != self.world_size or int(state["batch_size"]) != self.batch_size
        )
        keys = ["seed", "seq_len", "shuffle"]
        keys += ["stream_blocks"] if regrouped else ["world_size", "num_blocks", "batch_size"]
        changed = [f"{k} {state[k]} -> {mine[k]}" for k in keys if k in state and int(state[k]) != int(mine[k])]
        if changed:
            raise DataError(
                f"cannot resume the data loader: {', '.join(changed)}; resume with the same data, seed, "
                f"batch size, sequence length and number of ranks"
            )
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        if regrouped:
            consumed, global_batch = int(state["blocks_consumed"]), self.batch_size * self.world_size
            if consumed % global_batch:
                raise DataError(
                    f"cannot resume the data loader: {consumed} blocks of epoch {self.epoch} were consumed, not a "
                    f"multiple of the new global batch {global_batch} (batch_size x world_size); resume with a "
                    f"global batch that divides it (the same batch_size x world_size continues exactly)"
                )
            self.position = consumed // global_batch


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
    separator: str = "auto",
    min_chars: int = 1,
) -> DataBundle:
    """Read, split (or take `val_source` as validation), tokenize and pack.

    With `val_source`, documents that also occur in it are removed from training, so the validation loss is never
    measured on trained-on text.
    """
    opts = {"text_field": text_field, "separator": separator, "min_chars": min_chars}
    docs_iter = read_documents(source, **opts) if isinstance(source, str | Path) else iter(source)
    docs = list(itertools.islice(docs_iter, max_docs))
    if not docs:
        raise DataError(f"no usable documents in {source}")
    if val_source is not None:
        val_docs, _ = split_documents(read_documents(val_source, **opts), 0.0, seed)
        val_keys = {_doc_key(d) for d in val_docs}
        train_docs, _ = split_documents((d for d in docs if _doc_key(d) not in val_keys), 0.0, seed)
        if not train_docs:
            raise DataError(f"every training document of {source} is also in the validation data {val_source}")
    else:
        train_docs, val_docs = split_documents(docs, val_fraction, seed)
    if not val_docs:
        raise DataError(
            f"the validation split is empty ({len(train_docs)} unique documents, val_fraction={val_fraction}): "
            f"raise val_fraction, add documents or give validation data"
        )
    return DataBundle(
        train=tokenize_documents(train_docs, tokenizer),
        val=tokenize_documents(val_docs, tokenizer),
        n_train_docs=len(train_docs),
        n_val_docs=len(val_docs),
    )


class StreamingBlockLoader:
    """(inputs, targets) batches packed on the fly from documents read lazily, for sources too large to hold.

    Documents are read in order, wrapped in BOS/EOS and cut into blocks of seq_len + 1 tokens with stride seq_len,
    exactly as `BlockLoader` cuts an in-memory stream; the tokens left over at the end of an epoch start the next
    one, so nothing is padded or thrown away. Rank r takes documents r, r + world_size, ... so ranks never read the
    same text. `val_fraction` > 0 holds out documents by `in_validation` (no memory needed), and `split` picks
    which side this loader reads. A shuffle buffer of `shuffle_buffer` blocks mixes neighbouring blocks, with each
    pick seeded from (seed, pick number).

    The state records the epoch, how many documents of the source were consumed, the tokens read but not yet
    emitted and the shuffle buffer, so a resumed loader re-opens the source, skips the consumed documents and
    yields the same batches an uninterrupted one would. Everything in it is plain ints (JSON-safe).

    `source` is a path or Hub dataset id (re-read with `read_documents` every epoch) or a zero-argument callable
    returning a fresh iterable of documents.
    """

    def __init__(
        self,
        source: str | Path | Callable[[], Iterable[str]],
        tokenizer: Any,
        *,
        batch_size: int,
        seq_len: int,
        seed: int = 0,
        shuffle_buffer: int = 0,
        rank: int = 0,
        world_size: int = 1,
        val_fraction: float = 0.0,
        split: str = "train",
        text_field: str = "text",
        separator: str = "auto",
        min_chars: int = 1,
        bos: bool = True,
        eos: bool = True,
        tokenize_batch: int = 64,
    ) -> None:
        if batch_size < 1 or seq_len < 1:
            raise DataError("batch_size and seq_len must be positive")
        if world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"rank must be in [0, world_size); got rank={rank}, world_size={world_size}")
        if split not in ("train", "val"):
            raise DataError(f"split must be 'train' or 'val', got {split!r}")
        if not 0.0 <= val_fraction < 1.0 or (split == "val" and val_fraction == 0.0):
            raise DataError(f"val_fraction must be in [0, 1) (and > 0 for split='val'), got {val_fraction}")
        self.source, self.tokenizer = source, tokenizer
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.shuffle_buffer = max(0, shuffle_buffer)
        self.rank, self.world_size = rank, world_size
        self.val_fraction, self.split = val_fraction, split
        self._read_opts = {"text_field": text_field, "separator": separator, "min_chars": min_chars}
        self.bos, self.eos, self.tokenize_batch = bos, eos, max(1, tokenize_batch)
        self.epoch = 0
        self.docs_consumed = 0  # documents of the source (all ranks, both splits) read in this epoch
        self._carry: list[int] = []
        self._buffer: list[list[int]] = []
        self._picks = 0

    def _open(self) -> Iterator[str]:
        if callable(self.source):
            return iter(self.source())
        return read_documents(self.source, **self._read_opts)

    def _wanted(self, index: int, doc: str) -> bool:
        if index % self.world_size != self.rank:
            return False
        if self.val_fraction == 0.0:
            return True
        return in_validation(doc, self.val_fraction, self.seed) == (self.split == "val")

    def _blocks(self) -> Iterator[list[int]]:
        """Blocks in stream order; advances docs_consumed/_carry only as tokens are actually handed out."""
        block = self.seq_len + 1
        while True:
            docs = self._open()
            skipped = sum(1 for _ in itertools.islice(docs, self.docs_consumed))
            if skipped < self.docs_consumed:
                raise DataError(
                    f"cannot resume: the source now has {skipped} documents, the saved position is "
                    f"{self.docs_consumed}; resume with the same data"
                )
            took_any = skipped > 0  # a resume may land after the last block of an epoch
            while True:
                start = self.docs_consumed
                chunk = list(itertools.islice(docs, self.tokenize_batch))
                if not chunk:
                    break
                wanted = [d for i, d in enumerate(chunk, start) if self._wanted(i, d)]
                new: list[int] = []
                if wanted:
                    took_any = True
                    for ids in _encode_docs(self.tokenizer, wanted, self.bos, self.eos, False):
                        new.extend(ids)
                self._carry = self._carry + new
                self.docs_consumed = start + len(chunk)
                while len(self._carry) >= block:
                    out = self._carry[:block]
                    self._carry = self._carry[self.seq_len :]
                    yield out
            if not took_any:
                raise DataError(
                    f"{self.source} has {self.docs_consumed} documents, none for rank {self.rank} of "
                    f"{self.world_size} on the {self.split} side; use fewer ranks or more data"
                )
            self.epoch += 1
            self.docs_consumed = 0

    def _shuffled(self) -> Iterator[list[int]]:
        if self.shuffle_buffer <= 1:
            yield from self._blocks()
            return
        for blk in self._blocks():
            self._buffer.append(blk)
            if len(self._buffer) >= self.shuffle_buffer:
                pick = random.Random(f"llamaforge-stream:{self.seed}:{self._picks}").randrange(len(self._buffer))
                self._picks += 1
                self._buffer[pick], self._buffer[-1] = self._buffer[-1], self._buffer[pick]
                yield self._buffer.pop()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        blocks = self._shuffled()
        while True:
            batch = torch.tensor([next(blocks) for _ in range(self.batch_size)], dtype=torch.int64)
            yield batch[:, :-1].contiguous(), batch[:, 1:].contiguous()

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "docs_consumed": self.docs_consumed,
            "carry": list(self._carry),
            "buffer": [list(b) for b in self._buffer],
            "picks": self._picks,
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "seq_len": self.seq_len,
            "batch_size": self.batch_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = self.state_dict()
        changed = [
            f"{k} {state[k]} -> {mine[k]}"
            for k in ("seed", "rank", "world_size", "seq_len", "batch_size")
            if k in state and state[k] != mine[k]
        ]
        if changed:
            raise DataError(f"cannot resume the streaming loader: {', '.join(changed)}; resume with the same settings")
        self.epoch = int(state["epoch"])
        self.docs_consumed = int(state["docs_consumed"])
        self._carry = [int(t) for t in state["carry"]]
        self._buffer = [[int(t) for t in b] for b in state["buffer"]]
        self._picks = int(state["picks"])
