"""llama2.c checkpoints (the tinyllamas family) and its tokenizer.bin.

Two checkpoint layouts exist. The legacy one (v0) starts with seven int32s (dim, hidden_dim, n_layers, n_heads,
n_kv_heads, vocab_size, seq_len; a negative vocab_size means the classifier is not shared with the embedding),
then every weight as float32 grouped by kind, including two precomputed RoPE tables that llamaforge ignores.
Version 1 starts with the magic "ak42", a version, the same seven ints and a shared-classifier byte, padded to 256
bytes, then the weights in a different order and without the RoPE tables. Both use Meta's interleaved RoPE, so q/k
rows are permuted on the way in and out (see meta_format).

llama2.c's `run` fixes what the file does not say: RoPE theta 10000, RMSNorm eps 1e-5, head_dim = dim / n_heads,
and generation that stops when the model emits BOS (id 1), the only document separator its training data has.
The spec produced here states all of these explicitly.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llamaforge.core.meta_format import hf_to_meta_state, meta_to_hf_state
from llamaforge.core.spec import ModelSpec
from llamaforge.core.tokenizer import Tokenizer
from llamaforge.errors import ModelFileError, SpecError

MAGIC = 0x616B3432  # "ak42" little-endian
HEADER_V1_BYTES = 256
_V0_HEADER = struct.Struct("<7i")
RUN_C_THETA = 10000.0
RUN_C_EPS = 1e-5
BOS_ID, EOS_ID, UNK_ID = 1, 2, 0


@dataclass(frozen=True)
class Llama2cConfig:
    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    seq_len: int
    shared_classifier: bool = True
    version: int = 0

    @property
    def head_size(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_size

    def weight_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """(Meta name, shape) in file order; `freq_cis_*` are v0's RoPE tables."""
        d, h, layers, v, kv = self.dim, self.hidden_dim, range(self.n_layers), self.vocab_size, self.kv_dim
        per_layer = {
            "attention_norm.weight": (d,),
            "attention.wq.weight": (d, d),
            "attention.wk.weight": (kv, d),
            "attention.wv.weight": (kv, d),
            "attention.wo.weight": (d, d),
            "ffn_norm.weight": (d,),
            "feed_forward.w1.weight": (h, d),
            "feed_forward.w2.weight": (d, h),
            "feed_forward.w3.weight": (h, d),
        }

        def group(name: str) -> list[tuple[str, tuple[int, ...]]]:
            return [(f"layers.{i}.{name}", per_layer[name]) for i in layers]

        out: list[tuple[str, tuple[int, ...]]] = []
        if self.version == 0:
            out.append(("tok_embeddings.weight", (v, d)))
            for name in ("attention_norm.weight", "attention.wq.weight", "attention.wk.weight", "attention.wv.weight"):
                out += group(name)
            for name in ("attention.wo.weight", "ffn_norm.weight"):
                out += group(name)
            for name in ("feed_forward.w1.weight", "feed_forward.w2.weight", "feed_forward.w3.weight"):
                out += group(name)
            out.append(("norm.weight", (d,)))
            half = self.head_size // 2
            out += [("freq_cis_real", (self.seq_len, half)), ("freq_cis_imag", (self.seq_len, half))]
        else:
            out += group("attention_norm.weight") + group("ffn_norm.weight")
            out += [("norm.weight", (d,)), ("tok_embeddings.weight", (v, d))]
            for name in (
                "attention.wq.weight",
                "attention.wk.weight",
                "attention.wv.weight",
                "attention.wo.weight",
                "feed_forward.w1.weight",
                "feed_forward.w2.weight",
                "feed_forward.w3.weight",
            ):
                out += group(name)
        if not self.shared_classifier:
            out.append(("output.weight", (v, d)))
        return out

    def header_bytes(self) -> int:
        return HEADER_V1_BYTES if self.version == 1 else _V0_HEADER.size

    def file_bytes(self) -> int:
        return self.header_bytes() + 4 * sum(math.prod(s) for _, s in self.weight_shapes())

    def validate(self, where: str) -> None:
        ints = (self.dim, self.hidden_dim, self.n_layers, self.n_heads, self.n_kv_heads, self.vocab_size, self.seq_len)
        if min(ints) <= 0:
            raise ModelFileError(f"{where}: header has a non-positive size {ints}; not a llama2.c checkpoint")
        if self.dim % self.n_heads or self.n_heads % self.n_kv_heads or self.head_size % 2:
            raise ModelFileError(
                f"{where}: header sizes are inconsistent (dim={self.dim}, n_heads={self.n_heads}, "
                f"n_kv_heads={self.n_kv_heads}); not a llama2.c checkpoint"
            )


def read_header(path: str | Path) -> Llama2cConfig:
    """The config of a llama2.c checkpoint, from its first bytes (nothing else is read)."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(HEADER_V1_BYTES)
    if len(head) < _V0_HEADER.size:
        raise ModelFileError(f"{path} is too short ({len(head)} bytes) to be a llama2.c checkpoint")
    (magic,) = struct.unpack_from("<I", head, 0)
    if magic == MAGIC:
        (version,) = struct.unpack_from("<i", head, 4)
        if version != 1:
            raise ModelFileError(
                f"{path} is a llama2.c version {version} checkpoint; only fp32 versions 0 (legacy) and 1 import "
                f"(re-export it with llama2.c's export.py --version 1)"
            )
        if len(head) < HEADER_V1_BYTES:
            raise ModelFileError(f"{path} is truncated inside its 256-byte header")
        params = struct.unpack_from("<7i", head, 8)
        shared = bool(head[36])
        cfg = Llama2cConfig(*params, shared_classifier=shared, version=1)
    else:
        params = list(_V0_HEADER.unpack_from(head, 0))
        shared = params[5] > 0
        params[5] = abs(params[5])
        cfg = Llama2cConfig(*params, shared_classifier=shared, version=0)
    cfg.validate(str(path))
    return cfg


def looks_like_checkpoint(path: str | Path) -> bool:
    """True when the header parses and the file size is exactly what it implies (a strong, cheap check)."""
    path = Path(path)
    if not path.is_file():
        return False
    try:
        cfg = read_header(path)
    except (ModelFileError, OSError):
        return False
    return path.stat().st_size == cfg.file_bytes()


def read_checkpoint(path: str | Path) -> tuple[Llama2cConfig, dict[str, torch.Tensor]]:
    """(config, Meta-named float32 tensors in llama2.c's interleaved layout)."""
    path = Path(path)
    cfg = read_header(path)
    size = path.stat().st_size
    if size != cfg.file_bytes():
        raise ModelFileError(
            f"{path} has {size:,} bytes but its llama2.c v{cfg.version} header (dim={cfg.dim}, "
            f"n_layers={cfg.n_layers}, vocab={cfg.vocab_size}) implies {cfg.file_bytes():,}; the file is truncated "
            f"or not an fp32 llama2.c checkpoint"
        )
    data = np.memmap(path, dtype="<f4", mode="r", offset=cfg.header_bytes())
    state: dict[str, torch.Tensor] = {}
    pos = 0
    for name, shape in cfg.weight_shapes():
        n = math.prod(shape)
        if not name.startswith("freq_cis"):
            state[name] = torch.from_numpy(np.array(data[pos : pos + n], dtype=np.float32).reshape(shape))
        pos += n
    del data
    return cfg, state


def spec_from_config(cfg: Llama2cConfig, *, name: str | None = None) -> ModelSpec:
    return ModelSpec.parse(
        {
            "name": name,
            "vocab_size": cfg.vocab_size,
            "dim": cfg.dim,
            "n_layers": cfg.n_layers,
            "n_heads": cfg.n_heads,
            "n_kv_heads": cfg.n_kv_heads,
            "head_dim": cfg.head_size,
            "ffn_hidden": cfg.hidden_dim,
            "norm_eps": RUN_C_EPS,
            "rope_theta": RUN_C_THETA,
            "max_positions": cfg.seq_len,
            "tie_embeddings": cfg.shared_classifier,
            "bos_token_id": BOS_ID if cfg.vocab_size > BOS_ID else None,
            "eos_token_id": BOS_ID if cfg.vocab_size > BOS_ID else None,
        },
        origin="spec derived from a llama2.c header",
    )


def load_llama2c(path: str | Path) -> tuple[ModelSpec, dict[str, torch.Tensor]]:
    """(spec, llamaforge-named state with q/k permuted to rotate_half) from a llama2.c checkpoint."""
    path = Path(path)
    cfg, state = read_checkpoint(path)
    spec = spec_from_config(cfg, name=path.stem)
    return spec, meta_to_hf_state(state, spec)


# ----- writing ----------------------------------------------------------------------------------------------------


def _rope_tables(cfg: Llama2cConfig) -> tuple[np.ndarray, np.ndarray]:
    """llama2.c's precomputed cos/sin tables (written by v0 exports; run.c itself recomputes RoPE)."""
    hs = cfg.head_size
    freqs = 1.0 / (RUN_C_THETA ** (torch.arange(0, hs, 2)[: hs // 2].float() / hs))
    angles = torch.outer(torch.arange(cfg.seq_len).float(), freqs)
    return torch.cos(angles).numpy(), torch.sin(angles).numpy()


def write_checkpoint(path: str | Path, cfg: Llama2cConfig, state: dict[str, Any]) -> Path:
    """Write Meta-named, interleaved-layout weights (numpy or torch) as a llama2.c v0 or v1 file, atomically."""
    from llamaforge.core.io import _atomic

    cfg.validate("llama2.c config")
    if cfg.version not in (0, 1):
        raise SpecError(f"llama2.c version {cfg.version} cannot be written; use 0 (legacy) or 1")
    tables = dict(zip(("freq_cis_real", "freq_cis_imag"), _rope_tables(cfg))) if cfg.version == 0 else {}

    def chunks():
        if cfg.version == 0:
            vocab = cfg.vocab_size if cfg.shared_classifier else -cfg.vocab_size
            yield _V0_HEADER.pack(
                cfg.dim, cfg.hidden_dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, vocab, cfg.seq_len
            )
        else:
            head = struct.pack("<Ii", MAGIC, 1)
            head += struct.pack(
                "<7i", cfg.dim, cfg.hidden_dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.vocab_size, cfg.seq_len
            )
            head += struct.pack("<B", int(cfg.shared_classifier))
            yield head + b"\0" * (HEADER_V1_BYTES - len(head))
        for name, shape in cfg.weight_shapes():
            value = tables[name] if name in tables else state.get(name)
            if value is None:
                raise SpecError(f"llama2.c export needs tensor {name!r}, which the state lacks")
            if isinstance(value, torch.Tensor):
                value = value.detach().to(torch.float32).cpu().numpy()
            value = np.ascontiguousarray(value, dtype="<f4")
            if value.shape != shape:
                raise SpecError(f"tensor {name} has shape {value.shape}; llama2.c's header implies {shape}")
            yield value.tobytes()

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            for chunk in chunks():
                f.write(chunk)

    path = Path(path)
    _atomic(path, write)
    return path


def check_llama2c_expressible(spec: ModelSpec) -> None:
    from llamaforge.core.meta_format import check_meta_expressible

    try:
        check_meta_expressible(spec)
    except SpecError as exc:
        raise SpecError(str(exc).replace("Meta's Llama format", "llama2.c's format")) from None
    problems = []
    if spec.rope_theta != RUN_C_THETA:
        problems.append(f"rope_theta={spec.rope_theta} (run.c hard-codes {RUN_C_THETA:g})")
    if spec.rope_scaling is not None and spec.rope_scaling.name != "default":
        problems.append("rope_scaling (run.c has none)")
    if spec.norm_eps != RUN_C_EPS:
        problems.append(f"norm_eps={spec.norm_eps} (run.c hard-codes {RUN_C_EPS:g})")
    if problems:
        raise SpecError("this model cannot be run by llama2.c: " + "; ".join(problems))


def save_llama2c(model: Any, path: str | Path, *, version: int = 1) -> Path:
    """Write a llamaforge model as a llama2.c checkpoint (q/k permuted back to the interleaved layout)."""
    spec: ModelSpec = model.spec
    check_llama2c_expressible(spec)
    state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    meta = hf_to_meta_state(state, spec)
    cfg = Llama2cConfig(
        dim=spec.dim,
        hidden_dim=spec.ffn_hidden_size,
        n_layers=spec.n_layers,
        n_heads=spec.n_heads,
        n_kv_heads=spec.kv_heads,
        vocab_size=spec.vocab_size,
        seq_len=spec.max_positions,
        shared_classifier=spec.tie_embeddings,
        version=version,
    )
    return write_checkpoint(path, cfg, meta)


# ----- tokenizer.bin ----------------------------------------------------------------------------------------------


class Llama2cTokenizer(Tokenizer):
    """llama2.c's tokenizer: pieces with scores, merged by run.c's greedy highest-score pair rule.

    The file holds `max_token_length` (int32) and then, per token, a float32 score, an int32 length and the piece's
    bytes; SentencePiece's '▁' is stored as a space, BOS/EOS as "\\n<s>\\n" / "\\n</s>\\n", raw bytes as "<0xXX>".

    It is a llamaforge `Tokenizer` whose transformers tokenizer (`.hf`, built on first use) is a byte-fallback BPE
    with merge ranks ordered by piece score, which encodes exactly as run.c does (`encode_runc`, kept as the
    executable definition, is what the tests compare against) but in Rust rather than an O(n^2) Python loop.
    `save(dir)` writes the Hugging Face files and tokenizer.bin side by side.
    """

    unk_id = UNK_ID

    def __init__(self, pieces: list[bytes], scores: list[float], max_token_length: int | None = None) -> None:
        if len(pieces) != len(scores):
            raise ValueError("pieces and scores must have the same length")
        self.pieces = list(pieces)
        self.scores = [float(s) for s in scores]
        self.max_token_length = max_token_length or max((len(p) for p in pieces), default=0)
        self._lookup: dict[bytes, int] = {}
        for i, p in enumerate(self.pieces):
            self._lookup.setdefault(p, i)
        self._hf: Any = None

    @property
    def hf(self) -> Any:
        if self._hf is None:
            self._hf = self.to_hf()
        return self._hf

    @hf.setter
    def hf(self, value: Any) -> None:
        self._hf = value

    @property
    def bos_id(self) -> int:
        return BOS_ID

    @property
    def eos_id(self) -> int:
        return EOS_ID

    @property
    def pad_id(self) -> int | None:
        return None if self._hf is None else self._hf.pad_token_id

    @property
    def vocab_size(self) -> int:
        return len(self.pieces) if self._hf is None else len(self._hf)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"Llama2cTokenizer(vocab_size={self.vocab_size}, max_token_length={self.max_token_length})"

    # --- file I/O
    @classmethod
    def load(cls, path: str | Path, vocab_size: int | None = None) -> Llama2cTokenizer:
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ModelFileError(f"cannot read llama2.c tokenizer {path}: {exc}") from None
        if len(data) < 4:
            raise ModelFileError(f"{path} is too short to be a llama2.c tokenizer.bin")
        (max_len,) = struct.unpack_from("<i", data, 0)
        pos, pieces, scores = 4, [], []
        while pos < len(data) and (vocab_size is None or len(pieces) < vocab_size):
            if pos + 8 > len(data):
                raise ModelFileError(f"{path} ends inside token {len(pieces)}'s header; the file is truncated")
            score, n = struct.unpack_from("<fi", data, pos)
            pos += 8
            if n < 0 or pos + n > len(data) or n > max(max_len, 0):
                raise ModelFileError(
                    f"{path}: token {len(pieces)} claims {n} bytes (max_token_length {max_len}); not a llama2.c "
                    f"tokenizer.bin"
                )
            pieces.append(data[pos : pos + n])
            scores.append(score)
            pos += n
        if vocab_size is not None and len(pieces) < vocab_size:
            raise ModelFileError(f"{path} holds {len(pieces)} tokens, the model needs {vocab_size}")
        return cls(pieces, scores, max_len)

    @staticmethod
    def looks_like(path: str | Path) -> bool:
        """A cheap sniff: the first few records parse."""
        path = Path(path)
        if not path.is_file():
            return False
        with open(path, "rb") as f:
            data = f.read(4096)
        if len(data) < 12:
            return False
        (max_len,) = struct.unpack_from("<i", data, 0)
        if not 0 < max_len < 1024:
            return False
        pos = 4
        for _ in range(3):
            if pos + 8 > len(data):
                return pos == len(data)
            score, n = struct.unpack_from("<fi", data, pos)
            if not (0 <= n <= max_len) or not math.isfinite(score):
                return False
            pos += 8 + n
        return True

    def save(self, directory: str | Path) -> None:
        """tokenizer.bin (for llama2.c) and the Hugging Face files (for everything else) into `directory`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.save_bin(directory / "tokenizer.bin")
        self.hf.save_pretrained(str(directory))

    def save_bin(self, path: str | Path) -> Path:
        """Write llama2.c's tokenizer.bin."""
        from llamaforge.core.io import atomic_write_bytes

        path = Path(path)
        out = [struct.pack("<i", self.max_token_length)]
        for piece, score in zip(self.pieces, self.scores):
            out.append(struct.pack("<fi", score, len(piece)) + piece)
        atomic_write_bytes(path, b"".join(out))
        return path

    @classmethod
    def from_sentencepiece(cls, model_file: str | Path) -> Llama2cTokenizer:
        """What llama2.c's tokenizer.py export writes for a SentencePiece model."""
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(model_file))
        pieces, scores = [], []
        for i in range(sp.get_piece_size()):
            piece = sp.id_to_piece(i)
            if i == sp.bos_id():
                piece = "\n<s>\n"
            elif i == sp.eos_id():
                piece = "\n</s>\n"
            pieces.append(piece.replace("▁", " ").encode("utf-8"))
            scores.append(sp.get_score(i))
        return cls(pieces, scores)

    # --- encoding, exactly as run.c's encode()
    def encode_runc(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        tokens: list[int] = [self.bos_id] if bos else []
        data = text.encode("utf-8")
        if data:
            space = self._lookup.get(b" ")
            if space is not None:
                tokens.append(space)
        i = 0
        while i < len(data):
            j = i + 1
            while j < len(data) and (data[j] & 0xC0) == 0x80 and j - i < 4:
                j += 1
            chunk = data[i:j]
            tid = self._lookup.get(chunk)
            if tid is not None:
                tokens.append(tid)
            else:
                tokens.extend(b + 3 for b in chunk)  # byte fallback: <0x00> is id 3
            i = j
        pieces, scores, lookup = self.pieces, self.scores, self._lookup
        while True:
            best_score, best_id, best_idx = -1e10, -1, -1
            for k in range(len(tokens) - 1):
                tid = lookup.get(pieces[tokens[k]] + pieces[tokens[k + 1]])
                if tid is not None and scores[tid] > best_score:
                    best_score, best_id, best_idx = scores[tid], tid, k
            if best_idx < 0:
                break
            tokens[best_idx : best_idx + 2] = [best_id]
        if eos:
            tokens.append(self.eos_id)
        return tokens

    # --- decoding
    def piece_bytes(self, prev_token: int | None, token: int) -> bytes:
        """run.c's decode(): drop a piece's leading space right after BOS, map <0xXX> to its byte."""
        piece = self.pieces[token]
        if prev_token == self.bos_id and piece.startswith(b" "):
            piece = piece[1:]
        if len(piece) == 6 and piece.startswith(b"<0x") and piece.endswith(b">"):
            try:
                return bytes([int(piece[3:5], 16)])
            except ValueError:
                pass
        return piece

    # --- Hugging Face conversion
    def hf_piece(self, i: int) -> str:
        if i == self.unk_id:
            return "<unk>"
        if i == self.bos_id:
            return "<s>"
        if i == self.eos_id:
            return "</s>"
        return self.pieces[i].decode("utf-8", errors="replace").replace(" ", "▁")

    def to_hf(self) -> Any:
        """A transformers fast tokenizer that encodes like run.c: BPE whose merge ranks follow the piece scores."""
        from tokenizers import Tokenizer, decoders, normalizers, processors
        from tokenizers.models import BPE
        from transformers import PreTrainedTokenizerFast

        vocab: dict[str, int] = {}
        for i in range(self.vocab_size):
            vocab.setdefault(self.hf_piece(i), i)
        special = {self.unk_id, self.bos_id, self.eos_id}
        ranked: list[tuple[float, int, int, int, str, str]] = []
        for piece, pid in vocab.items():
            if pid in special or len(piece) < 2 or (piece.startswith("<0x") and piece.endswith(">")):
                continue
            for cut in range(1, len(piece)):
                a, b = piece[:cut], piece[cut:]
                if a in vocab and b in vocab:
                    ranked.append((-self.scores[pid], pid, vocab[a], vocab[b], a, b))
        ranked.sort()
        merges = [(a, b) for *_, a, b in ranked]
        model = BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True)
        tok = Tokenizer(model)
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.decoder = decoders.Sequence(
            [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
        )
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", self.bos_id)]
        )
        from tokenizers import AddedToken

        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")])
        return PreTrainedTokenizerFast(
            tokenizer_object=tok,
            bos_token="<s>",
            eos_token="</s>",
            unk_token="<unk>",
            clean_up_tokenization_spaces=False,
        )


def load_llama2c_tokenizer(path: str | Path, vocab_size: int | None = None) -> Llama2cTokenizer:
    return Llama2cTokenizer.load(path, vocab_size)


def tokenizer_beside(model_path: str | Path) -> Path | None:
    """llama2.c keeps tokenizer.bin beside its checkpoints; the one next to `model_path`, if any."""
    candidate = Path(model_path).parent / "tokenizer.bin"
    return candidate if candidate.is_file() and Llama2cTokenizer.looks_like(candidate) else None


def find_tokenizer(model: str | Path, tokenizer: str | Path | None = None) -> Tokenizer | None:
    """The tokenizer for MODEL: `tokenizer` if given (a directory, tokenizer.model/.json, or llama2.c's
    tokenizer.bin), else the one in the model directory or, for a llama2.c checkpoint file, tokenizer.bin beside it.
    None when there is none. llama2.c's tokenizer.bin is preferred where it exists: it is the exact original."""
    from llamaforge.core.tokenizer import is_tokenizer_dir, load_tokenizer

    if tokenizer is not None:
        path = Path(tokenizer)
        if not path.exists():
            raise ModelFileError(f"tokenizer path {path} does not exist")
        if path.is_file() and Llama2cTokenizer.looks_like(path):
            return Llama2cTokenizer.load(path)
        if path.is_dir() and Llama2cTokenizer.looks_like(path / "tokenizer.bin"):
            return Llama2cTokenizer.load(path / "tokenizer.bin")
        return load_tokenizer(path)
    model = Path(model)
    if model.is_file():
        beside = tokenizer_beside(model)
        return Llama2cTokenizer.load(beside) if beside else None
    if Llama2cTokenizer.looks_like(model / "tokenizer.bin"):
        return Llama2cTokenizer.load(model / "tokenizer.bin")
    if is_tokenizer_dir(model):
        return load_tokenizer(model)
    return None
