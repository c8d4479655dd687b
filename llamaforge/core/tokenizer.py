"""Tokenizers: train a byte-level BPE, or load Hugging Face, Llama 2 (SentencePiece) and Llama 3 (tiktoken) files.

Everything becomes a transformers fast tokenizer underneath, so a tokenizer saved by llamaforge is a plain
`tokenizer.json` that `AutoTokenizer.from_pretrained` reads. BOS/EOS are added explicitly by `encode`, and the pad
token is explicit too (`add_pad_token`): packing never pads, so pad only matters for batched generation and
serving, and it is kept out of every loss.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from llamaforge.errors import ModelFileError

LLAMA3_PATTERN = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"  # noqa: E501
LLAMA3_SPECIALS = [
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
] + [f"<|reserved_special_token_{2 + i}|>" for i in range(256 - 11)]  # Meta's rule: 256 specials in all
BOS, EOS, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
_PLAIN_FAST_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")


class Tokenizer:
    """A thin wrapper over a transformers fast tokenizer with explicit BOS/EOS/pad handling."""

    def __init__(self, hf: Any) -> None:
        self.hf = hf

    # ----- special ids ----------------------------------------------------------------------------------------
    @property
    def bos_id(self) -> int | None:
        return self.hf.bos_token_id

    @property
    def eos_id(self) -> int | None:
        return self.hf.eos_token_id

    @property
    def pad_id(self) -> int | None:
        return self.hf.pad_token_id

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def chat_template(self) -> str | None:
        return getattr(self.hf, "chat_template", None)

    def add_pad_token(self, token: str = "<PAD>") -> int:
        """Add (or reuse) a pad token and return its id; the vocabulary grows by one if it is new."""
        if self.hf.pad_token is None:
            self.hf.add_special_tokens({"pad_token": token})
        return int(self.hf.pad_token_id)

    # ----- encoding -------------------------------------------------------------------------------------------
    def encode(self, text: str, *, bos: bool = False, eos: bool = False, allow_special: bool = True) -> list[int]:
        """Token ids of `text`, with BOS/EOS only where asked.

        `allow_special=False` encodes special-token strings found in the text ("<|eot_id|>", "<s>", "<PAD>") as
        ordinary text, as Meta's tiktoken encoder and SentencePiece do: training text must not be able to inject
        control tokens (or pad) into the stream. True (the default) parses them, which chat templates rely on.
        """
        return self.encode_batch([text], bos=bos, eos=eos, allow_special=allow_special)[0]

    def encode_batch(
        self, texts: list[str], *, bos: bool = False, eos: bool = False, allow_special: bool = True
    ) -> list[list[int]]:
        if not texts:
            return []
        hf = self.hf
        if type(hf).__name__ in _PLAIN_FAST_CLASSES and hasattr(hf.backend_tokenizer, "encode_batch_fast"):
            # The generic fast class adds no Python-side processing, so the Rust tokenizer can be called directly:
            # about 1.7x faster than going through transformers' BatchEncoding.
            raw = hf.backend_tokenizer
            before = raw.encode_special_tokens
            raw.encode_special_tokens = not allow_special
            try:
                out = [e.ids for e in raw.encode_batch_fast(list(texts), add_special_tokens=False)]
            finally:
                raw.encode_special_tokens = before
        else:
            out = hf(list(texts), add_special_tokens=False, split_special_tokens=not allow_special)["input_ids"]
        return [self._wrap(list(ids), bos, eos) for ids in out]

    def _wrap(self, ids: list[int], bos: bool, eos: bool) -> list[int]:
        if bos:
            if self.bos_id is None:
                raise ModelFileError("this tokenizer has no BOS token; encode with bos=False")
            ids = [self.bos_id, *ids]
        if eos:
            if self.eos_id is None:
                raise ModelFileError("this tokenizer has no EOS token; encode with eos=False")
            ids = [*ids, self.eos_id]
        return ids

    def decode(self, ids: Sequence[int], *, skip_special: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special, clean_up_tokenization_spaces=False)

    def token_to_id(self, token: str) -> int | None:
        tid = self.hf.convert_tokens_to_ids(token)
        return None if tid is None or (tid == self.hf.unk_token_id and token != self.hf.unk_token) else int(tid)

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.hf.save_pretrained(str(directory))

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_id}, eos={self.eos_id}, pad={self.pad_id})"


def _fast(tok: Any, **specials: Any) -> Tokenizer:
    from transformers import PreTrainedTokenizerFast

    return Tokenizer(PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False, **specials))


def train_tokenizer(texts: Iterable[str], vocab_size: int, *, min_frequency: int = 2, seed: int = 0) -> Tokenizer:
    """Train a byte-level BPE (any Unicode round-trips) with BOS/EOS/pad specials at ids 0, 1, 2.

    `seed` is accepted for interface symmetry: BPE training is deterministic for a given input order.
    """
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    specials = [BOS, EOS, PAD]
    if vocab_size < 256 + len(specials):
        raise ValueError(f"vocab_size must be at least {256 + len(specials)} for a byte-level BPE, got {vocab_size}")
    raw = RawTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    raw.train_from_iterator((t for t in texts), trainer=trainer)
    if raw.get_vocab_size() <= len(specials):
        raise ValueError("cannot train a tokenizer on an empty corpus")
    _bos_post_processor(raw, BOS)
    return _fast(raw, bos_token=BOS, eos_token=EOS, pad_token=PAD)


def _bos_post_processor(raw: Any, bos: str) -> None:
    """`add_special_tokens=True` prepends BOS, as Hugging Face's Llama tokenizers do.

    llamaforge's own `encode` never relies on it (it adds BOS/EOS explicitly); this is for code that loads the saved
    directory with `AutoTokenizer` and calls it the usual way.
    """
    from tokenizers import processors

    raw.post_processor = processors.TemplateProcessing(
        single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, raw.token_to_id(bos))]
    )


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE vocabularies."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, map(chr, chars)))


def _is_tiktoken_file(path: Path) -> bool:
    try:
        with path.open("rb") as fh:
            first = fh.readline().split()
        return len(first) == 2 and first[1].isdigit() and bool(base64.b64decode(first[0], validate=True))
    except (OSError, ValueError):
        return False


def load_llama3_tiktoken(path: str | Path) -> Tokenizer:
    """Meta's Llama 3 `tokenizer.model` (base64 token + rank lines) as a fast tokenizer with 256 specials."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as RawTokenizer

    byte_map = _bytes_to_unicode()
    ranks: dict[bytes, int] = {}
    with Path(path).open("rb") as fh:
        for lineno, line in enumerate(fh, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2:
                raise ModelFileError(f"{path}:{lineno}: expected 'base64-token rank', got {line[:60]!r}")
            ranks[base64.b64decode(parts[0])] = int(parts[1])
    # One byte is one character of the byte-level alphabet, so latin-1 decoding + a translation table maps a token
    # to its vocabulary string, and splitting that string at i splits the token's bytes at i.
    table = str.maketrans({chr(b): c for b, c in byte_map.items()})
    vocab = {tok.decode("latin-1").translate(table): rank for tok, rank in ranks.items()}
    # tiktoken stores ranks, not merges: it repeatedly joins the adjacent pair whose concatenation has the lowest
    # rank, whatever the halves' ranks. So every split of a token into two tokens is a merge with the token's rank
    # as priority (ties broken by the halves' ranks), and `ignore_merges` takes a whole pre-token found in the
    # vocabulary as-is, as tiktoken does before merging.
    merges: list[tuple[int, int, int, str, str]] = []
    for word, rank in vocab.items():
        for i in range(1, len(word)):
            a, b = word[:i], word[i:]
            ra, rb = vocab.get(a), vocab.get(b)
            if ra is not None and rb is not None:
                merges.append((rank, ra, rb, a, b))
    merges.sort()
    raw = RawTokenizer(models.BPE(vocab=vocab, merges=[(m[3], m[4]) for m in merges], ignore_merges=True))
    raw.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    raw.decoder = decoders.ByteLevel()
    raw.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in LLAMA3_SPECIALS])
    _bos_post_processor(raw, BOS)
    tok = _fast(raw, bos_token=BOS, eos_token=EOS)
    if tok.bos_id != 128000 and len(ranks) == 128000:
        raise ModelFileError(f"{path}: special tokens landed at {tok.bos_id}, expected 128000")
    return tok


def load_sentencepiece(path: str | Path) -> Tokenizer:
    """A SentencePiece `tokenizer.model` (Llama 2) converted to a fast tokenizer that encodes like SentencePiece.

    SentencePiece (with allow_whitespace_only_pieces) cuts the text into words, each a run of U+2581 plus the text
    up to the next one, and merges inside a word by piece score; whitespace-only pieces ("__", "___") score -1e9,
    so they merge last. transformers' conversion orders merges by piece id instead, which puts "_ _" first (id
    259) and turns "world  x" into [_world, __, x] where SentencePiece gives [_world, _, _x]. Moving the
    whitespace-only merges to the end and splitting into SentencePiece's words restores its output exactly.
    """
    import json
    import shutil
    import tempfile

    from tokenizers import Regex, normalizers, pre_tokenizers
    from tokenizers import Tokenizer as RawTokenizer
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(path, Path(tmp) / "tokenizer.model")
        config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": False, "add_eos_token": False, "legacy": True}
        (Path(tmp) / "tokenizer_config.json").write_text(json.dumps(config))
        try:
            hf = AutoTokenizer.from_pretrained(tmp)
        except Exception as exc:
            raise ModelFileError(f"cannot read SentencePiece model {path}: {exc}") from None
    state = json.loads(hf.backend_tokenizer.to_str())
    merges = state["model"].get("merges") or []

    def whitespace_only(merge: list[str] | str) -> bool:
        return set("".join(merge).replace(" ", "") if isinstance(merge, str) else "".join(merge)) == {"\u2581"}

    state["model"]["merges"] = [m for m in merges if not whitespace_only(m)] + [m for m in merges if whitespace_only(m)]
    raw = RawTokenizer.from_str(json.dumps(state))
    raw.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    raw.pre_tokenizer = pre_tokenizers.Split(Regex("\u2581*[^\u2581]+|\u2581+"), behavior="isolated")
    # A LlamaTokenizer rebuilds its pipeline from vocab and merges when loaded, which would undo all of the above;
    # a plain fast tokenizer saves and reloads tokenizer.json as it is.
    _bos_post_processor(raw, hf.bos_token)
    return _fast(raw, bos_token=hf.bos_token, eos_token=hf.eos_token, unk_token=hf.unk_token)


def is_tokenizer_dir(path: str | Path) -> bool:
    """Whether `path` is a directory holding a tokenizer `load_tokenizer` can read (a model or run dir too)."""
    path = Path(path)
    return path.is_dir() and any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer.bin"))


def _load_llama2c(path: Path) -> Tokenizer:
    from llamaforge.core.llama2c import Llama2cTokenizer

    if not Llama2cTokenizer.looks_like(path):
        raise ModelFileError(f"{path} is not a llama2.c tokenizer.bin")
    return Llama2cTokenizer.load(path)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Auto-detect and load a tokenizer.

    Accepts a directory with Hugging Face tokenizer files (tokenizer.json; also a llamaforge model or run
    directory), a Llama 3 tiktoken `tokenizer.model` (base64 rank lines), a Llama 2 SentencePiece
    `tokenizer.model`, a llama2.c `tokenizer.bin`, or a directory holding one of these files.
    """
    path = Path(path)
    if not path.exists():
        raise ModelFileError(f"tokenizer path {path} does not exist")
    if path.is_dir():
        if (path / "tokenizer.json").is_file():
            from transformers import AutoTokenizer

            try:
                return Tokenizer(AutoTokenizer.from_pretrained(str(path)))
            except Exception as exc:
                raise ModelFileError(f"cannot load the tokenizer in {path}: {exc}") from None
        for name in ("tokenizer.model", "tokenizer.bin"):
            if (path / name).is_file():
                return load_tokenizer(path / name)
        raise ModelFileError(
            f"{path} has no tokenizer.json, tokenizer.model or tokenizer.bin; pass the tokenizer's path explicitly"
        )
    if path.name == "tokenizer.json":
        return load_tokenizer(path.parent)
    if path.suffix == ".bin":
        return _load_llama2c(path)
    if _is_tiktoken_file(path):
        return load_llama3_tiktoken(path)
    return load_sentencepiece(path)
