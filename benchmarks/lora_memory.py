"""LoRA / QLoRA training memory and step time: llamaforge against full fine-tuning and against transformers + PEFT.

    python benchmarks/lora_memory.py --gpu                      # H200: every phase, prints a table and ratios
    python benchmarks/lora_memory.py --gpu --phases 8b --json lora.json
    python benchmarks/lora_memory.py --spec tiny --large-spec tiny --seq-len 64 --batch 2 --steps 2 --warmup 1
                                                                # CPU smoke test (times only, no memory figures)

Phases (random weights and tokens; the loss value is not the point):
  1b   the small spec (default llama3.2-1b), batch x seq tokens per step, bf16 autocast:
       full     fp32 weights, AdamW over every parameter (what `llamaforge train` does)
       lora     bf16 frozen base, LoRA (rank r, alpha 2r) on every linear layer, AdamW over the adapter only
       qlora    the same with the base's linear layers in NF4 (llamaforge's `nf4` quantizer), embeddings bf16
       hf-lora  transformers LlamaForCausalLM (bf16, same weights) + peft LoRA, same settings
       hf-qlora transformers with bitsandbytes 4-bit NF4 + peft LoRA (when bitsandbytes loads on the GPU)
  8b   QLoRA on the large spec (default llama3-8b) at --large-seq-len (2048), batch 1, activation checkpointing:
       peak GPU memory against the 16 GiB target.

Peak memory is torch.cuda.max_memory_allocated over the timed steps (weights, adapter, optimizer state,
activations); step time is the median over --steps steps after --warmup steps. Ratios are printed side by side.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import tempfile
import time
from contextlib import nullcontext
from typing import Any

import torch

from llamaforge.core import finetune as ft
from llamaforge.core.loading import apply_transform
from llamaforge.core.model import build_model
from llamaforge.core.spec import load_spec

GIB = 1024**3
TARGET_GIB = 16.0


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpu", action="store_true", help="run on CUDA (the default when a GPU is present)")
    p.add_argument("--phases", default="1b,8b", help="comma-separated subset of 1b,8b")
    p.add_argument("--configs", default="full,lora,qlora,hf-lora,hf-qlora", help="1b phase configurations")
    p.add_argument("--spec", default="llama3.2-1b")
    p.add_argument("--large-spec", default="llama3-8b")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--large-seq-len", type=int, default=2048)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--targets", default="all-linear")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing in the 1b phase too")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--json", default=None, help="write all results here")
    return p.parse_args()


def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def timed_steps(step, device: torch.device, steps: int, warmup: int) -> dict[str, Any]:
    """Run `step()` warmup + steps times; median step seconds and peak memory over the timed steps."""
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / GIB if device.type == "cuda" else None
    return {"step_s": statistics.median(times), "peak_gib": peak}


def ours_step(model, optimizer, params, device, batch, seq, vocab):
    gen = torch.Generator(device="cpu").manual_seed(0)
    tokens = torch.randint(0, vocab, (batch, seq + 1), generator=gen).to(device)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    def step() -> None:
        with _autocast(device):
            loss = model(inputs, targets, return_logits=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def llamaforge_model(spec, device, kind: str, rank: int, targets: str, checkpointing: bool):
    """full: fp32 weights, all trainable. lora/qlora: bf16 base (NF4 linears for qlora), adapter only trains."""
    dtype = "float32" if kind == "full" or device.type == "cpu" else "bfloat16"
    model = build_model(spec, device=device, dtype=dtype, seed=0)
    if kind == "qlora":
        model = apply_transform(model, "quantizer", "nf4", exclude=["lm_head"], embeddings=False)
        free()
    if kind == "full":
        params = [p for p in model.parameters() if p.requires_grad]
    else:
        ft.add_adapter(model, "lora", rank=rank, alpha=2.0 * rank, targets=targets, seed=0)
        params = ft.mark_only_adapter_trainable(model, "default")
    model.gradient_checkpointing = checkpointing
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
    return model.train(), params, optimizer


def run_ours(spec, device, kind, args, *, seq, batch, checkpointing) -> dict[str, Any]:
    model, params, optimizer = llamaforge_model(spec, device, kind, args.rank, args.targets, checkpointing)
    step = ours_step(model, optimizer, params, device, batch, seq, spec.vocab_size)
    result = timed_steps(step, device, args.steps, args.warmup)
    result["trainable_params"] = sum(p.numel() for p in params)
    return result


def run_hf(spec, device, kind, args, *, seq, batch, checkpointing) -> dict[str, Any]:
    """transformers + peft with the same weights, rank, targets, batch and precision."""
    import peft
    import transformers

    from llamaforge.plugins.exporters import export_hf

    names = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    with tempfile.TemporaryDirectory() as tmp:
        ours = build_model(spec, device="cpu", dtype="bfloat16" if device.type == "cuda" else "float32", seed=0)
        export_hf(ours, tmp)
        del ours
        free()
        kwargs: dict[str, Any] = {"dtype": torch.bfloat16 if device.type == "cuda" else torch.float32}
        if kind == "hf-qlora":
            kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_compute_dtype=torch.bfloat16,
                bnb_4bit_use_double_quant=False,
            )
            kwargs["device_map"] = {"": device.index or 0}
        hf = transformers.LlamaForCausalLM.from_pretrained(tmp, **kwargs)
    if kind != "hf-qlora":
        hf.to(device)
    if checkpointing:
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        hf.enable_input_require_grads()
    config = peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=names, lora_dropout=0.0)
    model = peft.get_peft_model(hf, config).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
    tokens = torch.randint(0, spec.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0)).to(device)

    def step() -> None:
        with _autocast(device):
            loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    result = timed_steps(step, device, args.steps, args.warmup)
    result["trainable_params"] = sum(p.numel() for p in params)
    return result  # the caller frees memory once this frame (model, optimizer) is gone


def _fmt(value: Any, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def main() -> None:
    args = parse_args()
    device = torch.device("cuda" if (args.gpu or torch.cuda.is_available()) else "cpu")
    if args.gpu and not torch.cuda.is_available():
        raise SystemExit("--gpu given but CUDA is not available")
    phases = {p.strip() for p in args.phases.split(",") if p.strip()}
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "settings": vars(args),
        "phases": {},
    }
    if "1b" in phases:
        spec = load_spec(args.spec)
        spec = spec.with_updates(max_positions=max(spec.max_positions, args.seq_len))
        tokens = args.batch * args.seq_len
        rows: dict[str, Any] = {}
        for kind in [c.strip() for c in args.configs.split(",") if c.strip()]:
            runner = run_hf if kind.startswith("hf-") else run_ours
            try:
                rows[kind] = runner(spec, device, kind, args, seq=args.seq_len, batch=args.batch,
                                    checkpointing=args.checkpointing)  # fmt: skip
                rows[kind]["tokens_per_s"] = tokens / rows[kind]["step_s"]
            except Exception as exc:  # a missing library or an OOM ends one row, not the benchmark
                rows[kind] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            free()  # after the except block, when the traceback no longer holds the failed run's tensors
            print(f"  {kind:9s} {rows[kind]}", flush=True)
        ratios = {}
        for num, den in (("lora", "full"), ("qlora", "lora"), ("qlora", "full"), ("lora", "hf-lora"),
                         ("qlora", "hf-qlora")):  # fmt: skip
            a, b = rows.get(num, {}), rows.get(den, {})
            if "step_s" in a and "step_s" in b:
                ratios[f"{num}/{den}"] = {
                    "step_time": a["step_s"] / b["step_s"],
                    "peak_memory": (a["peak_gib"] / b["peak_gib"]) if a.get("peak_gib") and b.get("peak_gib") else None,
                }
        results["phases"]["1b"] = {"spec": args.spec, "rows": rows, "ratios": ratios}
        print(f"\n{args.spec}: batch {args.batch} x seq {args.seq_len}, rank {args.rank} on {args.targets}, "
              f"checkpointing {args.checkpointing}")  # fmt: skip
        print(f"{'config':10s} {'trainable':>14s} {'peak GiB':>9s} {'step ms':>9s} {'tokens/s':>10s}")
        for kind, row in rows.items():
            if "error" in row:
                print(f"{kind:10s} {row['error']}")
                continue
            print(f"{kind:10s} {row['trainable_params']:>14,d} {_fmt(row['peak_gib'], '9.2f')} "
                  f"{row['step_s'] * 1e3:9.1f} {row['tokens_per_s']:10,.0f}")  # fmt: skip
        for name, r in ratios.items():
            print(f"  {name:16s} step time x{r['step_time']:.2f}  peak memory x{_fmt(r['peak_memory'], '.2f')}")
    if "8b" in phases:
        spec = load_spec(args.large_spec)
        spec = spec.with_updates(max_positions=max(spec.max_positions, args.large_seq_len))
        try:
            row = run_ours(spec, device, "qlora", args, seq=args.large_seq_len, batch=1, checkpointing=True)
            row["tokens_per_s"] = args.large_seq_len / row["step_s"]
            free()
            if row["peak_gib"] is not None:
                row["within_target"] = row["peak_gib"] <= TARGET_GIB
        except Exception as exc:
            row = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        results["phases"]["8b"] = {"spec": args.large_spec, "seq_len": args.large_seq_len, "batch": 1, **row}
        print(f"\nQLoRA {args.large_spec} seq {args.large_seq_len} batch 1, activation checkpointing: {row}")
        if row.get("peak_gib") is not None:
            verdict = "within" if row["peak_gib"] <= TARGET_GIB else "ABOVE"
            print(f"  peak {row['peak_gib']:.2f} GiB: {verdict} the {TARGET_GIB:.0f} GiB target")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(results, fh, indent=2, default=str)


if __name__ == "__main__":
    main()
