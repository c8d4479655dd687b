"""`llamaforge tokenizer train|encode|decode|info`."""

from __future__ import annotations

import itertools
import sys
import time
from pathlib import Path

import click

from llamaforge.cli._util import emit, json_option


def _describe(tok) -> dict:
    return {
        "vocab_size": tok.vocab_size,
        "bos_id": tok.bos_id,
        "eos_id": tok.eos_id,
        "pad_id": tok.pad_id,
        "bos_token": getattr(tok.hf, "bos_token", None),
        "eos_token": getattr(tok.hf, "eos_token", None),
        "pad_token": getattr(tok.hf, "pad_token", None),
    }


@click.group("tokenizer")
def tokenizer_group() -> None:
    """Train, inspect and use tokenizers (a directory, a Llama 2 or a Llama 3 tokenizer.model)."""


@tokenizer_group.command("train")
@click.option("--data", required=True, help="A .txt/.jsonl/.parquet file, a directory of them, or a Hub dataset id.")
@click.option("--vocab-size", type=int, default=4096, show_default=True)
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Directory to write.")
@click.option("--min-frequency", type=int, default=2, show_default=True)
@click.option("--text-field", default="text", show_default=True, help="Field holding the text in .jsonl/.parquet.")
@click.option("--separator", type=click.Choice(["auto", "line", "blank"]), default="auto", show_default=True)
@click.option("--max-docs", type=int, default=None, help="Train on the first N documents only.")
@json_option
def train_cmd(data, vocab_size, out, min_frequency, text_field, separator, max_docs, as_json) -> None:
    """Train a byte-level BPE tokenizer (BOS/EOS/pad specials) and save it as tokenizer.json."""
    from llamaforge.core.data import DataError, read_documents
    from llamaforge.core.tokenizer import train_tokenizer

    docs = list(itertools.islice(read_documents(data, text_field=text_field, separator=separator), max_docs))
    if not docs:
        raise DataError(f"no usable documents in {data}")
    start = time.perf_counter()
    try:
        tok = train_tokenizer(docs, vocab_size, min_frequency=min_frequency)
    except ValueError as exc:
        raise DataError(f"{exc}; pass a larger --vocab-size") from None
    seconds = time.perf_counter() - start
    tok.save(out)
    sample = docs[:2000]
    n_tokens = sum(len(ids) for ids in tok.encode_batch(sample, allow_special=False))
    info = {
        **_describe(tok),
        "out": str(out),
        "documents": len(docs),
        "seconds": round(seconds, 3),
        "chars_per_token": round(sum(map(len, sample)) / max(1, n_tokens), 3),
    }
    emit(
        info,
        as_json,
        f"trained a {tok.vocab_size}-entry byte-level BPE on {len(docs)} documents in {seconds:.1f}s "
        f"({info['chars_per_token']} characters per token) -> {out}",
    )


@tokenizer_group.command("encode")
@click.argument("tokenizer")
@click.argument("text")
@click.option("--bos/--no-bos", default=False, help="Prepend BOS.")
@click.option("--eos/--no-eos", default=False, help="Append EOS.")
@click.option("--plain-text", is_flag=True, help="Encode special-token strings in TEXT as ordinary text.")
@json_option
def encode_cmd(tokenizer, text, bos, eos, plain_text, as_json) -> None:
    """Token ids of TEXT ('-' reads standard input)."""
    from llamaforge.core.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer)
    if text == "-":
        text = sys.stdin.read()
    ids = tok.encode(text, bos=bos, eos=eos, allow_special=not plain_text)
    tokens = tok.hf.convert_ids_to_tokens(ids)
    emit({"ids": ids, "tokens": tokens, "n_tokens": len(ids)}, as_json, " ".join(map(str, ids)))


@tokenizer_group.command("decode")
@click.argument("tokenizer")
@click.argument("ids", nargs=-1, type=int, required=True)
@click.option("--keep-special", is_flag=True, help="Keep BOS/EOS/pad and other special tokens in the text.")
@json_option
def decode_cmd(tokenizer, ids, keep_special, as_json) -> None:
    """The text of token IDS."""
    from llamaforge.core.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer)
    bad = [i for i in ids if not 0 <= i < tok.vocab_size]
    if bad:
        from llamaforge.errors import LlamaforgeError

        raise LlamaforgeError(f"ids {bad} are outside the vocabulary [0, {tok.vocab_size}); check the tokenizer")
    text = tok.decode(list(ids), skip_special=not keep_special)
    emit({"text": text}, as_json, text)


@tokenizer_group.command("info")
@click.argument("tokenizer")
@click.option("--save", type=click.Path(file_okay=False, path_type=Path), help="Also save it as tokenizer.json here.")
@json_option
def info_cmd(tokenizer, save, as_json) -> None:
    """Vocabulary size and special tokens; `--save DIR` converts a tokenizer.model into a tokenizer.json directory."""
    from llamaforge.core.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer)
    info = _describe(tok)
    if save is not None:
        tok.save(save)
        info["saved"] = str(save)
    emit(info, as_json, "\n".join(f"{k}: {v}" for k, v in info.items()))


def register(cli: click.Group) -> None:
    cli.add_command(tokenizer_group)
