"""`llamaforge train`, `eval`, `ablate` and `quickstart`."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from llamaforge.cli._util import emit, json_option
from llamaforge.errors import LlamaforgeError

set_option = click.option(
    "--set", "overrides", multiple=True, metavar="NAME=VALUE", help="Override a training-spec field (repeatable)."
)


def _prepare_tokenizer(data, tokenizer_path, vocab_size, seed, pad_token=None, max_docs=None):
    from llamaforge.core.data import read_documents
    from llamaforge.core.tokenizer import load_tokenizer, train_tokenizer

    if tokenizer_path:
        tok = load_tokenizer(tokenizer_path)
    else:
        docs = data if isinstance(data, list) else read_documents(data)
        if max_docs is not None:
            import itertools

            docs = itertools.islice(docs, max_docs)
        tok = train_tokenizer(docs, vocab_size, seed=seed)
    if pad_token:
        tok.add_pad_token(pad_token)
    return tok


def _echo_err(message: str) -> None:
    click.echo(message, err=True)


def run_training(
    *,
    spec_source,
    data,
    out,
    train_overrides=None,
    train_spec_file=None,
    tokenizer_path=None,
    vocab_size=4096,
    val_data=None,
    resume=False,
    progress=True,
    seed_docs=None,
    model_overrides=None,
    pad_token=None,
    stop_after=None,
    max_docs=None,
    echo=_echo_err,
    rank=0,
    world_size=1,
):
    """Shared by train and quickstart: tokenizer, data, model, Trainer.fit. Returns (result, model, tok, bundle).

    `spec_source` may be a run file (model + train + data + tokenizer); explicit arguments win over its entries.
    On --resume the run's own train.yaml, tokenizer and weights are used (overrides still apply, e.g. more steps).
    """
    from llamaforge.core.data import prepare_data
    from llamaforge.core.loading import load_model_and_tokenizer
    from llamaforge.core.model import build_model
    from llamaforge.core.spec import load_spec
    from llamaforge.core.train import TRAIN_SPEC_FILE, Trainer, TrainSpec, fit_spec_to_tokenizer, read_run_file

    out = Path(out)
    run_file = read_run_file(spec_source) if isinstance(spec_source, str | Path) else None
    train_source = train_spec_file
    if run_file is not None:
        spec_source = run_file.get("model", spec_source)
        data = data or run_file.get("data")
        val_data = val_data or run_file.get("val_data")
        tokenizer_path = tokenizer_path or run_file.get("tokenizer")
        pad_token = pad_token or run_file.get("pad_token")
        vocab_size = run_file.get("vocab_size", vocab_size)
        model_overrides = {**(run_file.get("model_updates") or {}), **(model_overrides or {})}
        if train_source is None and "train" in run_file:
            train_source = run_file["train"]
    if resume and train_source is None and (out / TRAIN_SPEC_FILE).exists():
        train_source = out / TRAIN_SPEC_FILE
    if data is None and seed_docs is None:
        raise LlamaforgeError("no training data: pass --data (or put `data:` in the run file)")
    tspec = TrainSpec.load(train_source, train_overrides)
    if resume:
        model, tok = load_model_and_tokenizer(out, require_tokenizer=True)
        model.train()
    else:
        source = seed_docs if seed_docs is not None else data
        from llamaforge.core.distributed import from_rank0  # every rank must use rank 0's tokenizer

        tok = from_rank0(
            lambda: _prepare_tokenizer(source, tokenizer_path, vocab_size, tspec.seed, pad_token, max_docs)
        )
        spec = load_spec(spec_source)
        if model_overrides:
            spec = spec.with_updates(**model_overrides)
        spec, notes = fit_spec_to_tokenizer(spec, tok, tspec.seq_len)
        for note in notes if rank == 0 else []:
            echo(f"note: {note}")
        model = build_model(spec, seed=tspec.seed, dtype="float32")
    docs = seed_docs if seed_docs is not None else data
    bundle = prepare_data(
        docs, tok, val_fraction=tspec.val_fraction, seed=tspec.seed, val_source=val_data, max_docs=max_docs
    )
    trainer = Trainer(
        model, tspec, bundle.train, bundle.val, out, tokenizer=tok, progress=progress, rank=rank, world_size=world_size
    )
    result = trainer.fit(resume=resume, stop_at=stop_after)
    return result, trainer.model, tok, bundle


@click.command("train")
@click.option(
    "--spec", "spec_source", required=True, help="Model spec (preset, YAML/JSON file) or a run file (model + train)."
)
@click.option("--data", default=None, help="Training text: .txt/.jsonl/.parquet file, directory or Hub id.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run directory.")
@click.option("--train-spec", "train_spec_file", type=click.Path(exists=True, dir_okay=False), default=None)
@click.option("--val-data", default=None, help="Validation text (default: a split of --data).")
@click.option("--tokenizer", "tokenizer_path", default=None, help="Tokenizer to use instead of training one.")
@click.option("--vocab-size", default=4096, show_default=True, help="Vocabulary of the tokenizer trained on --data.")
@click.option("--pad-token", default=None, help="Add this pad token to the tokenizer if it has none (e.g. '<PAD>').")
@click.option("--max-docs", default=None, type=int, help="Use at most this many documents (Hub streams).")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint.")
@click.option("--stop-after", default=None, type=int, help="Stop (checkpointed) after this many steps; --resume later.")
@set_option
@json_option
def train_cmd(
    spec_source,
    data,
    out,
    train_spec_file,
    val_data,
    tokenizer_path,
    vocab_size,
    pad_token,
    max_docs,
    resume,
    stop_after,
    overrides,
    as_json,
):
    """Train a model from a spec; the run directory is a loadable model.

    Every training-spec field can be set with --set (e.g. --set lr=1e-3 --set steps=200)."""
    from llamaforge.core.distributed import init_distributed, shutdown
    from llamaforge.core.train import parse_overrides

    train_overrides = parse_overrides(list(overrides))
    # under torchrun (RANK/WORLD_SIZE set): join the process group; the Trainer shards the model with FSDP2
    launch = init_distributed(str(train_overrides.get("device", "auto")))
    try:
        result, model, _, _ = run_training(
            rank=launch.rank,
            world_size=launch.world_size,
            spec_source=spec_source,
            data=data,
            out=out,
            train_overrides=train_overrides,
            train_spec_file=train_spec_file,
            tokenizer_path=tokenizer_path,
            vocab_size=vocab_size,
            val_data=val_data,
            resume=resume,
            progress=not as_json,
            pad_token=pad_token,
            stop_after=stop_after,
            max_docs=max_docs,
        )
    except BaseException:
        shutdown(wait_for_all=False)
        raise
    summary = {
        "run": str(out),
        "steps": result.steps,
        "train_loss": result.train_loss,
        "val_loss": result.val_loss,
        "tokens": result.tokens,
        "tokens_per_s": result.tokens_per_s,
        "seconds": result.seconds,
        "params": model.num_parameters(),
    }
    shutdown()
    if not launch.is_main:  # one summary, from rank 0
        return
    if launch.distributed:
        summary["world_size"] = launch.world_size
    emit(summary, as_json, _human_summary(summary))


def _human_summary(s: dict) -> str:
    val = f"{s['val_loss']:.4f}" if s.get("val_loss") is not None else "n/a"
    return (
        f"run {s['run']}: {s['steps']} steps, train loss {s['train_loss']:.4f}, val loss {val}, "
        f"{s['tokens_per_s']:,.0f} tokens/s, {s['seconds']:.0f} s, {s['params']:,} parameters"
    )


@click.command("eval")
@click.argument("model_path", metavar="MODEL")
@click.option("--data", required=True, help="Evaluation text.")
@click.option("--tokenizer", "tokenizer_path", default=None)
@click.option("--seq-len", default=None, type=int, help="Block length (default: min(max_positions, 256)).")
@click.option("--batch-size", default=8, show_default=True)
@click.option("--max-batches", default=None, type=int)
@click.option("--adapter", default=None, help="A LoRA adapter directory to apply.")
@json_option
def eval_cmd(model_path, data, tokenizer_path, seq_len, batch_size, max_batches, adapter, as_json):
    """Loss and perplexity of MODEL on DATA (JSON keys: loss, perplexity).

    MODEL is a run directory or anything `llamaforge.load_model` reads (e.g. a Hugging Face directory)."""
    import torch

    from llamaforge.core.data import read_documents, tokenize_documents
    from llamaforge.core.evaluate import evaluate, evaluate_path

    if adapter:
        from llamaforge.cli._util import apply_adapter
        from llamaforge.core.loading import load_model_and_tokenizer

        device = "cuda" if torch.cuda.is_available() else "cpu"
        model, tok = load_model_and_tokenizer(
            model_path, tokenizer=tokenizer_path, require_tokenizer=True, device=device
        )
        model = apply_adapter(model, adapter)
        tokens = tokenize_documents(read_documents(data), tok)
        dtype = torch.bfloat16 if device == "cuda" else None
        metrics = evaluate(
            model, tokens, batch_size=batch_size, seq_len=seq_len, max_batches=max_batches, autocast_dtype=dtype
        )
    else:
        metrics = evaluate_path(
            model_path, data, tokenizer=tokenizer_path, batch_size=batch_size, seq_len=seq_len, max_batches=max_batches
        )
    emit(
        metrics,
        as_json,
        f"loss {metrics['loss']:.4f}  perplexity {metrics['perplexity']:.3f}  ({metrics['tokens']:,} tokens)",
    )


@click.command("ablate")
@click.option(
    "--spec", "spec_source", required=True, help="Base model spec (preset/file) or a run file with model, train, vary."
)
@click.option(
    "--vary",
    "vary",
    multiple=True,
    metavar="PATH=A,B[,C]",
    help="A spec path and its values (repeatable; all combinations run). `model=` takes presets/spec files, "
    "`train.FIELD=` varies the training spec.",
)
@click.option("--data", default=None, help="Training text (or `data:` in the run file).")
@click.option("--val-data", default=None, help="Validation text (default: a split of --data).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Directory for the runs and the report.")
@click.option("--train-spec", "train_spec_file", type=click.Path(exists=True, dir_okay=False), default=None)
@click.option("--tokenizer", "tokenizer_path", default=None, help="Tokenizer to use instead of training one.")
@click.option("--vocab-size", default=None, type=int, help="Vocabulary of a tokenizer trained on --data.")
@click.option("--pad-token", default=None, help="Add this pad token to the tokenizer if it has none.")
@click.option("--max-docs", default=None, type=int)
@click.option("--resume", is_flag=True, help="Continue (or reuse) variant runs already in --out.")
@set_option
@json_option
def ablate_cmd(
    spec_source,
    vary,
    data,
    val_data,
    out,
    train_spec_file,
    tokenizer_path,
    vocab_size,
    pad_token,
    max_docs,
    resume,
    overrides,
    as_json,
):
    """Train variants of a spec on the same data order, seed and token budget; compare them.

    Writes OUT/results.md, results.csv, results.json and val_curves.png; each variant is a run directory in OUT."""
    from llamaforge.core.data import prepare_data
    from llamaforge.core.train import TrainSpec, parse_overrides, parse_vary, read_run_file, run_ablation

    run_file = read_run_file(spec_source) or {}
    base_model = run_file.get("model", spec_source) if run_file else spec_source
    axes = parse_vary(run_file.get("vary") or {}) if run_file else []
    cli_axes = parse_vary(list(vary))
    if cli_axes:  # command-line axes replace run-file axes of the same path
        cli_paths = {p for p, _ in cli_axes}
        axes = [a for a in axes if a[0] not in cli_paths] + cli_axes
    if not axes:
        raise LlamaforgeError("nothing to vary: give --vary PATH=A,B (e.g. --vary norm=rmsnorm,layernorm)")
    data = data or run_file.get("data")
    if data is None:
        raise LlamaforgeError("no training data: pass --data (or put `data:` in the run file)")
    val_data = val_data or run_file.get("val_data")
    tspec = TrainSpec.load(train_spec_file or run_file.get("train"), parse_overrides(list(overrides)))
    model_updates = run_file.get("model_updates") or {}
    say = (lambda m: None) if as_json else _echo_err
    tok = _prepare_tokenizer(
        data,
        tokenizer_path or run_file.get("tokenizer"),
        vocab_size or run_file.get("vocab_size", 4096),
        tspec.seed,
        pad_token or run_file.get("pad_token"),
        max_docs,
    )
    bundle = prepare_data(
        data, tok, val_fraction=tspec.val_fraction, seed=tspec.seed, val_source=val_data, max_docs=max_docs
    )
    say(
        f"ablation: {len(bundle.train):,} training tokens ({bundle.n_train_docs:,} docs), {len(bundle.val):,} "
        f"validation tokens; tokenizer vocabulary {tok.vocab_size:,}; {tspec.total_steps} steps x "
        f"{tspec.tokens_per_step:,} tokens per variant"
    )
    rows = run_ablation(
        base_model,
        tspec,
        axes,
        tokenizer=tok,
        train_tokens=bundle.train,
        val_tokens=bundle.val,
        out=out,
        progress=not as_json,
        resume=resume,
        echo=say,
        model_updates=model_updates,
    )
    if as_json:
        emit([{k: v for k, v in r.items() if k != "curve"} for r in rows], True)
    else:
        click.echo((Path(out) / "results.md").read_text())
        click.echo(f"table: {Path(out) / 'results.csv'}  curves: {Path(out) / 'val_curves.png'}")


@click.command("quickstart")
@click.option("--data", default=None, help="Real data instead of the built-in corpus (file, dir or Hub id).")
@click.option("--out", default="runs/quickstart", show_default=True, type=click.Path(file_okay=False))
@click.option("--steps", default=400, show_default=True, help="Training steps (16 x 128 tokens each).")
@click.option("--stories", default=6000, show_default=True, help="Stories generated for the built-in corpus.")
@click.option("--vocab-size", default=2048, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--max-docs", default=20000, show_default=True, help="Documents read from --data (Hub streams).")
@click.option("--batch-size", default=16, show_default=True, help="Sequences of 128 tokens per step.")
@click.option("--sample-tokens", default=60, show_default=True, help="Tokens generated per sample prompt.")
@click.option("--threads", default=None, type=int, help="CPU threads (default: the cores not busy with other work).")
@json_option
def quickstart_cmd(data, out, steps, stories, vocab_size, seed, max_docs, batch_size, sample_tokens, threads, as_json):
    """Train a tokenizer and the `tiny` model offline in a few minutes, evaluate, and generate samples."""
    from llamaforge.core.corpus import generate_corpus
    from llamaforge.core.generation import GenerationConfig, generate_text

    started = time.perf_counter()
    threads = _cpu_threads(threads)
    docs = None if data else list(generate_corpus(stories, seed=seed))
    if docs is not None:  # kept in the run directory, so `train --resume` can continue on the same data
        from llamaforge.core.io import atomic_write_text

        atomic_write_text(Path(out) / "corpus.txt", "\n".join(docs) + "\n")
    overrides = {
        "steps": steps,
        "seq_len": 128,
        "batch_size": batch_size,
        "lr": 3e-3,
        "min_lr": 3e-4,
        "warmup_steps": min(30, steps // 5),
        "eval_every": max(50, steps // 6),
        "eval_batches": 10,
        "log_every": 10,
        "seed": seed,
    }
    if not as_json:
        source = data or f"the built-in story corpus ({stories:,} generated stories)"
        click.echo(f"llamaforge quickstart: training `tiny` on {source} for {steps} steps -> {out}")
        if threads is not None:
            click.echo(f"(CPU: {threads} thread(s); other work keeps the other cores busy, --threads overrides)")
    result, model, tok, bundle = run_training(
        spec_source="tiny",
        data=data,
        out=out,
        train_overrides=overrides,
        vocab_size=vocab_size,
        seed_docs=docs,
        progress=not as_json,
        max_docs=max_docs if data else None,
        echo=(lambda m: None) if as_json else _echo_err,
    )
    from llamaforge.core.train import evaluate

    metrics = evaluate(model, bundle.val, batch_size=16, seq_len=128)
    prompts = ["Once upon a time", "One day, Mia went to", "The little dog"]
    config = GenerationConfig.from_options(temperature=0.8, top_k=40, max_new_tokens=sample_tokens, seed=seed)
    samples = generate_text(model.eval(), tok, prompts, config)
    summary = {
        "run": str(out),
        "params": model.num_parameters(),
        "steps": result.steps,
        "train_docs": bundle.n_train_docs,
        "val_docs": bundle.n_val_docs,
        "train_tokens": int(bundle.train.numel()),
        "train_loss": result.train_loss,
        "val_loss": metrics["loss"],
        "val_perplexity": metrics["perplexity"],
        "tokens_per_s": result.tokens_per_s,
        "seconds": time.perf_counter() - started,
        "samples": [{"prompt": p, "completion": s} for p, s in zip(prompts, samples)],
    }
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    click.echo("\nSamples:")
    for p, s in zip(prompts, samples):
        click.echo(f"  {p} ->{s}")
    click.echo(
        f"\nSummary: {summary['params']:,} parameters, {result.steps} steps, train loss {result.train_loss:.3f}, "
        f"validation loss {metrics['loss']:.3f} (perplexity {metrics['perplexity']:.2f}), "
        f"{result.tokens_per_s:,.0f} tokens/s, {summary['seconds']:.0f} s in all."
    )
    click.echo(f"Run directory: {out} (model, tokenizer, metrics, loss_curve.png, checkpoint). Next:")
    click.echo(f"  llamaforge generate {out} --prompt 'Once upon a time' --temperature 0.8 --top-k 40")
    data_arg = data or f"{out}/corpus.txt"
    click.echo(f"  llamaforge eval {out} --data {data_arg}")
    click.echo(f"  llamaforge train --spec tiny --data {data_arg} --out {out} --resume --set steps={2 * steps}")


def _cpu_threads(requested: int | None) -> int | None:
    """Threads for CPU training: on a machine whose cores are busy with other work, fewer threads than cores.

    PyTorch's worker threads spin while they wait for each other; when another process holds one of the cores, a
    two-thread step on two cores was measured 5x slower than a one-thread step (0.63 s vs 3.4 s per step of the
    quickstart). Returns the number set, or None when nothing was changed (GPU, or an idle machine)."""
    import os

    import torch

    if torch.cuda.is_available() and requested is None:
        return None
    if requested is None:
        cores = torch.get_num_threads()
        try:
            busy = int(os.getloadavg()[0] + 0.5)
        except OSError:
            return None
        if busy == 0 or cores <= 1:
            return None
        requested = max(1, min(cores, (os.cpu_count() or cores) - busy))
        if requested == cores:
            return None
    torch.set_num_threads(max(1, requested))
    return torch.get_num_threads()


def register(cli: click.Group) -> None:
    cli.add_command(train_cmd)
    cli.add_command(eval_cmd)
    cli.add_command(ablate_cmd)
    cli.add_command(quickstart_cmd)
