"""`llamaforge quantize MODEL --method METHOD --out DIR`: quantize, save, and report what it cost and saved.

Sizes are the bytes of the weight files on disk before and after (never parameter-count arithmetic), and the
perplexity after is measured on the model loaded back from DIR, so the report describes what was written.
"""

from __future__ import annotations

from pathlib import Path

import click

from llamaforge.cli._util import emit, json_option

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def weight_files(path: str | Path) -> list[Path]:
    """The files holding a model's weights: model.safetensors for a llamaforge directory, every weight file at
    the top of any other directory (sharded Hugging Face checkpoints, Meta's consolidated.*.pth), or the file."""
    from llamaforge.core.loading import WEIGHTS_FILE, is_llamaforge_dir

    path = Path(path)
    if path.is_file():
        return [path]
    if is_llamaforge_dir(path):
        return [path / WEIGHTS_FILE]
    return sorted(p for p in path.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)


def weight_bytes(path: str | Path) -> int:
    return sum(p.stat().st_size for p in weight_files(path))


def _parse_params(pairs: tuple[str, ...]) -> dict:
    from llamaforge.core.train import parse_overrides

    return parse_overrides(list(pairs))


@click.command("quantize")
@click.argument("model_path", metavar="MODEL")
@click.option(
    "--method",
    "methods",
    multiple=True,
    required=True,
    help="Quantizer name (int8_dynamic, int8_weight_only, nf4, int8_embedding or a plugin's); repeat to stack.",
)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Directory for the quantized model.")
@click.option("--include", multiple=True, help="Only modules matching this name pattern (fnmatch; repeatable).")
@click.option("--exclude", multiple=True, help="Keep modules matching this pattern unquantized, e.g. lm_head.")
@click.option("--param", "params", multiple=True, metavar="NAME=VALUE", help="Quantizer option, e.g. blocksize=128.")
@click.option("--eval-data", default=None, help="Held-out text: report perplexity before and after.")
@click.option("--tokenizer", "tokenizer_path", default=None, help="Tokenizer for --eval-data (default: MODEL's).")
@click.option("--seq-len", default=None, type=int, help="Evaluation block length (default: min(max_positions, 256)).")
@click.option("--batch-size", default=8, show_default=True)
@click.option("--max-batches", default=None, type=int, help="Evaluate on at most this many batches.")
@click.option("--device", default="cpu", show_default=True, help="Device to quantize and evaluate on.")
@json_option
def quantize_cmd(
    model_path,
    methods,
    out,
    include,
    exclude,
    params,
    eval_data,
    tokenizer_path,
    seq_len,
    batch_size,
    max_batches,
    device,
    as_json,
):
    """Quantize MODEL into DIR; report bytes on disk before/after and, with --eval-data, perplexity before/after.

    JSON keys: bytes_before, bytes_after, ratio, and perplexity_before / perplexity_after when measured."""
    from llamaforge.core.loading import apply_transform, load_model, load_model_and_tokenizer, save_model
    from llamaforge.registry.manager import lookup

    options = _parse_params(params)
    if include:
        options["include"] = list(include)
    if exclude:
        options["exclude"] = list(exclude)
    for method in methods:  # unknown names and options fail before any loading, naming what is accepted
        lookup("quantizer", method).validate_params(options)

    model, tok = load_model_and_tokenizer(
        model_path, tokenizer=tokenizer_path, device=device, require_tokenizer=eval_data is not None
    )
    model.eval()
    bytes_before = weight_bytes(model_path)

    tokens = None
    before = after = None
    if eval_data is not None:
        from llamaforge.core.data import read_documents, tokenize_documents
        from llamaforge.core.evaluate import evaluate

        tokens = tokenize_documents(read_documents(eval_data), tok)
        kwargs = {"batch_size": batch_size, "seq_len": seq_len, "max_batches": max_batches}
        before = evaluate(model, tokens, **kwargs)

    for method in methods:
        model = apply_transform(model, "quantizer", method, **options)
    out = Path(out)
    save_model(model, out, metadata={"quantized": ",".join(methods)})
    if tok is not None:
        tok.save(out)
    bytes_after = weight_bytes(out)

    reloaded = load_model(out, device=device)
    if tokens is not None:
        after = evaluate(reloaded, tokens, **kwargs)

    from llamaforge.plugins.quantizers import quantized_modules

    formats: dict[str, int] = {}
    for fmt in quantized_modules(reloaded).values():
        formats[fmt] = formats.get(fmt, 0) + 1
    report = {
        "model": str(model_path),
        "out": str(out),
        "methods": list(methods),
        "params": options,
        "quantized_modules": formats,
        "bytes_before": bytes_before,
        "bytes_after": bytes_after,
        "ratio": bytes_before / bytes_after if bytes_after else None,
    }
    if before is not None and after is not None:
        report.update(
            {
                "loss_before": before["loss"],
                "loss_after": after["loss"],
                "perplexity_before": before["perplexity"],
                "perplexity_after": after["perplexity"],
                "perplexity_change": after["perplexity"] / before["perplexity"] - 1.0,
                "eval_tokens": after["tokens"],
            }
        )
    emit(report, as_json, _human(report))


def _human(r: dict) -> str:
    mods = ", ".join(f"{n} {fmt}" for fmt, n in sorted(r["quantized_modules"].items())) or "none"
    lines = [
        f"quantized {r['model']} with {' + '.join(r['methods'])} -> {r['out']} ({mods})",
        f"weights on disk: {r['bytes_before']:,} -> {r['bytes_after']:,} bytes ({r['ratio']:.2f}x smaller)",
    ]
    if "perplexity_before" in r:
        lines.append(
            f"perplexity: {r['perplexity_before']:.3f} -> {r['perplexity_after']:.3f} "
            f"({100 * r['perplexity_change']:+.2f}%, {r['eval_tokens']:,} tokens)"
        )
    return "\n".join(lines)


def register(cli: click.Group) -> None:
    cli.add_command(quantize_cmd)
