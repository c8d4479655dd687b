"""`llamaforge lora ...`: train, merge, inspect LoRA adapters and exchange them with PEFT."""

from __future__ import annotations

from pathlib import Path

import click

from llamaforge.cli._util import emit, json_option


@click.group("lora")
def lora_group() -> None:
    """LoRA / QLoRA adapters: train on instructions or text, merge, export to and import from PEFT."""


def _load_base(base: str, tokenizer: str | None, device: str | None = None, *, require_tokenizer: bool = True):
    from llamaforge.core.loading import load_model_and_tokenizer

    return load_model_and_tokenizer(base, tokenizer=tokenizer, device=device, require_tokenizer=require_tokenizer)


@lora_group.command("train")
@click.argument("base", metavar="BASE")
@click.option("--data", required=True, help="Alpaca-format .json/.jsonl (instruction, input, output) or a text file.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Adapter directory to write.")
@click.option(
    "--format", "data_format", type=click.Choice(["auto", "alpaca", "text"]), default="auto", show_default=True
)
@click.option("--template", default="alpaca", show_default=True, help="Prompt template for instruction data.")
@click.option("--rank", default=8, show_default=True)
@click.option("--alpha", default=16.0, show_default=True)
@click.option("--dropout", default=0.0, show_default=True)
@click.option("--targets", default="q_proj,v_proj", show_default=True,
              help="Module names/patterns, comma-separated; groups: attention, mlp, all-linear; lm_head.")  # fmt: skip
@click.option("--rslora", is_flag=True, help="Scale by alpha/sqrt(rank) instead of alpha/rank.")
@click.option("--quantize", default=None, help="Quantize the frozen base first (e.g. nf4 for QLoRA).")
@click.option("--steps", default=200, show_default=True)
@click.option("--lr", default=1e-3, show_default=True)
@click.option("--batch-size", default=8, show_default=True)
@click.option("--seq-len", default=256, show_default=True)
@click.option("--warmup-steps", default=10, show_default=True)
@click.option("--val-fraction", default=0.05, show_default=True)
@click.option("--eval-every", default=50, show_default=True)
@click.option("--activation-checkpointing", is_flag=True, help="Recompute block activations in backward.")
@click.option("--device", default="auto", show_default=True)
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default="auto", show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--tokenizer", "tokenizer_path", default=None, help="Tokenizer (default: the one stored with BASE).")
@json_option
def train_cmd(base, data, out, data_format, template, rank, alpha, dropout, targets, rslora, quantize, steps, lr,
              batch_size, seq_len, warmup_steps, val_fraction, eval_every, activation_checkpointing, device, precision,
              seed, tokenizer_path, as_json):  # fmt: skip
    """Train a LoRA adapter on BASE; only the adapter (kilobytes to megabytes) is written to --out."""
    from llamaforge.core import finetune as ft
    from llamaforge.core.train import resolve_device

    config = ft.FinetuneConfig(
        steps=steps,
        lr=lr,
        batch_size=batch_size,
        seq_len=seq_len,
        warmup_steps=min(warmup_steps, max(0, steps - 1)),
        eval_every=eval_every,
        seed=seed,
        device=device,
        precision=precision,
        activation_checkpointing=activation_checkpointing,
    )
    target_device = resolve_device(device)
    model, tok = _load_base(base, tokenizer_path, str(target_device))
    if quantize:
        from llamaforge.core.loading import apply_transform

        model = apply_transform(model, "quantizer", quantize)
    result = ft.train_lora(
        model,
        tok,
        data,
        out,
        data_format=data_format,
        rank=rank,
        alpha=alpha,
        dropout=dropout,
        targets=targets,
        rslora=rslora,
        config=config,
        val_fraction=val_fraction,
        template=template,
        progress=not as_json,
    )
    size = sum(f.stat().st_size for f in Path(out).iterdir() if f.is_file())
    summary = {
        "adapter": str(out),
        "base": str(base),
        "quantized_base": quantize,
        "trainable_params": result.trainable_params,
        "base_params": model.num_parameters(),
        "adapter_bytes": size,
        "steps": result.steps,
        "train_loss": result.train_loss,
        "val_loss_before": result.val_loss_before,
        "val_loss": result.val_loss,
        "tokens": result.tokens,
        "seconds": result.seconds,
    }
    val = (
        f", val loss {result.val_loss_before:.4f} -> {result.val_loss:.4f}"
        if result.val_loss is not None and result.val_loss_before is not None
        else ""
    )
    emit(
        summary,
        as_json,
        f"adapter {out}: {result.trainable_params:,} trainable parameters ({size / 1024:,.0f} KiB on disk), "
        f"{result.steps} steps, train loss {result.train_loss:.4f}{val}, {result.seconds:.0f} s",
    )


@lora_group.command("merge")
@click.argument("base", metavar="BASE")
@click.argument("adapter", metavar="ADAPTER")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Model directory to write.")
@click.option("--tokenizer", "tokenizer_path", default=None)
@json_option
def merge_cmd(base, adapter, out, tokenizer_path, as_json):
    """Fold ADAPTER into BASE's weights and save a plain model (no adapter code needed to run it)."""
    from llamaforge.core import finetune as ft
    from llamaforge.core.loading import save_model

    model, tok = _load_base(base, tokenizer_path, require_tokenizer=False)
    ft.load_adapter(model, adapter)
    names = ft.adapter_names(model)
    ft.merge_and_remove(model)
    save_model(model, out)
    if tok is not None:
        tok.save(out)
    emit({"model": str(out), "merged": names, "adapter": str(adapter)}, as_json, f"merged {adapter} into {out}")


@lora_group.command("export-peft")
@click.argument("base", metavar="BASE")
@click.argument("adapter", metavar="ADAPTER")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="PEFT adapter directory to write.")
@click.option("--base-out", default=None, type=click.Path(file_okay=False),
              help="Also export BASE as a Hugging Face model directory here (what PeftModel loads onto).")  # fmt: skip
@click.option("--tokenizer", "tokenizer_path", default=None)
@json_option
def export_peft_cmd(base, adapter, out, base_out, tokenizer_path, as_json):
    """Write ADAPTER in PEFT's format (adapter_config.json + adapter_model.safetensors)."""
    from llamaforge.core import finetune as ft
    from llamaforge.core.peft_interop import export_peft

    model, tok = _load_base(base, tokenizer_path, require_tokenizer=False)
    if base_out:
        from llamaforge.registry.manager import lookup

        lookup("exporter", "hf").factory().export(model, Path(base_out), tokenizer=tok)
    ft.load_adapter(model, adapter)
    export_peft(model, out, ft.adapter_names(model)[0], base_model_name_or_path=base_out)
    emit(
        {"peft_adapter": str(out), "hf_base": base_out},
        as_json,
        f"PEFT adapter written to {out}" + (f"; Hugging Face base model in {base_out}" if base_out else ""),
    )


@lora_group.command("import-peft")
@click.argument("base", metavar="BASE")
@click.argument("peft_dir", metavar="PEFT_ADAPTER")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="llamaforge adapter directory to write.")
@json_option
def import_peft_cmd(base, peft_dir, out, as_json):
    """Convert a PEFT LoRA adapter for BASE's transformers twin into a llamaforge adapter directory."""
    from llamaforge.core import finetune as ft
    from llamaforge.core.peft_interop import import_peft

    model, _ = _load_base(base, None, require_tokenizer=False)
    import_peft(model, peft_dir)
    ft.save_adapter(model, out, "default", extra={"imported_from": str(peft_dir)})
    emit({"adapter": str(out), "source": str(peft_dir)}, as_json, f"imported {peft_dir} -> {out}")


@lora_group.command("info")
@click.argument("adapter", metavar="ADAPTER")
@json_option
def info_cmd(adapter, as_json):
    """Type, parameters, wrapped modules and training summary of an adapter directory."""
    from llamaforge.core import finetune as ft

    config = ft.read_adapter_config(adapter)
    params = config.get("params", {})
    lines = [
        f"{adapter}: {config['type']} adapter on {len(config.get('modules', []))} modules",
        "  " + ", ".join(f"{k}={v}" for k, v in params.items()),
        "  base: " + ", ".join(f"{k}={v}" for k, v in config.get("base", {}).items()),
    ]
    training = config.get("training")
    if training:
        lines.append("  training: " + ", ".join(f"{k}={v}" for k, v in training.items()))
    emit(config, as_json, "\n".join(lines))


def register(cli: click.Group) -> None:
    cli.add_command(lora_group)
