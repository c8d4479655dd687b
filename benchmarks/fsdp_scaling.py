"""FSDP2 scaling: training tokens/s on 1 vs N GPUs, an 8B-shaped model with full AdamW state sharded over N GPUs,
and FSDP + QLoRA of the 8B shape. One launch measures every phase side by side:

    torchrun --nproc-per-node 2 benchmarks/fsdp_scaling.py                    # 2 GPUs (also 4, 8)
    torchrun --nproc-per-node 2 benchmarks/fsdp_scaling.py --phases 1b --json fsdp.json
    torchrun --nproc-per-node 2 benchmarks/fsdp_scaling.py --device cpu --spec-small tiny --spec-large tiny \
        --seq-len 32 --batch-small 2 --batch-large 2 --batch-qlora 2 --steps 2 --warmup 1   # CPU smoke test (gloo)

Phases (random weights, random tokens; the loss is not the point):
  1b     the small spec (default llama3.2-1b) trained the way `llamaforge train` trains it on one GPU (fp32 weights,
         bf16 autocast, fused AdamW; rank 0 alone, the other ranks wait), then FSDP over all N ranks with the same
         per-GPU micro-batch (bf16 mixed-precision policy, fp32 reduction). Ratio = N-GPU tokens/s / 1-GPU tokens/s.
  8b     the large spec (default llama3-8b) with full fp32 AdamW state: first tried on one GPU (16 bytes per
         parameter before activations: it is expected not to fit), then FSDP over N ranks with activation
         checkpointing; peak memory per GPU reported.
  qlora  the large spec quantized to NF4 (llamaforge's `nf4` quantizer: bitsandbytes codes in uint8 tensors), LoRA
         on every linear layer; the frozen 4-bit base is sharded over the N ranks (integer buffers become frozen
         FSDP parameters), only the LoRA parameters train. Also on rank 0 alone for the ratio.

Tokens/s counts every rank's tokens over the wall time of `--steps` steps after `--warmup` steps.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import time
from contextlib import nullcontext
from datetime import UTC, datetime
from typing import Any

import torch
import torch.distributed as dist

import llamaforge
from llamaforge.core.distributed import barrier, init_distributed, shard_model, shutdown
from llamaforge.core.model import build_model
from llamaforge.core.spec import load_spec

GIB = 1024**3


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--phases", default="1b,8b,qlora", help="comma-separated subset of 1b,8b,qlora")
    p.add_argument("--device", default="auto", help="auto (cuda when present), cuda or cpu (gloo smoke test)")
    p.add_argument("--spec-small", default="llama3.2-1b")
    p.add_argument("--spec-large", default="llama3-8b")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch-small", type=int, default=8, help="sequences per GPU per step, 1b phase")
    p.add_argument("--batch-large", type=int, default=2, help="sequences per GPU per step, 8b phase")
    p.add_argument("--batch-qlora", type=int, default=4, help="sequences per GPU per step, qlora phase")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--no-single-8b", action="store_true", help="skip the one-GPU attempt of the 8b phase")
    p.add_argument("--json", default=None, help="write the results here (rank 0)")
    return p.parse_args()


class Phase:
    """One measurement: where it ran, what it reached, how much memory it took."""

    def __init__(self, name: str, gpus: int, spec: str, batch: int, seq: int, note: str = "") -> None:
        self.row: dict[str, Any] = {
            "phase": name,
            "gpus": gpus,
            "spec": spec,
            "batch_per_gpu": batch,
            "seq_len": seq,
            "status": "ok",
            "note": note,
        }


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated() / GIB if device.type == "cuda" else None


def materialise(model: torch.nn.Module, device: torch.device) -> None:
    """After fully_shard on the meta device: allocate each rank's shard, then initialise it in place."""
    model.to_empty(device=device)
    model.init_weights()
    for module in model.modules():
        reset = getattr(module, "reset_buffers", None)
        if callable(reset):
            reset()


def full_model(spec_name: str, device: torch.device, *, sharded: bool, ac: bool, bf16: bool) -> torch.nn.Module:
    """fp32 master weights; sharded models are built on the meta device so no rank ever holds the whole model."""
    spec = load_spec(spec_name)
    if not sharded:
        model = build_model(spec, device=device, dtype="float32", seed=0)
    else:
        from torch.distributed.device_mesh import init_device_mesh

        model = build_model(spec, device="meta", dtype="float32")
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        shard_model(model, param_dtype=torch.bfloat16 if bf16 else None, mesh=mesh)
        materialise(model, device)
    model.gradient_checkpointing = ac
    return model.train()


def qlora_model(spec_name: str, device: torch.device, *, sharded: bool, rank: int, bf16: bool) -> torch.nn.Module:
    """Random bf16 weights quantized to NF4 on the device, LoRA on every linear layer, base frozen."""
    from llamaforge.core.finetune import add_adapter, mark_only_adapter_trainable
    from llamaforge.core.loading import apply_transform

    dtype = "bfloat16" if bf16 else "float32"
    model = build_model(load_spec(spec_name), device=device, dtype=dtype, seed=0)
    model = apply_transform(model, "quantizer", "nf4")
    free(device)
    model = add_adapter(model, "lora", rank=rank, alpha=2 * rank, targets="all-linear", seed=0)
    mark_only_adapter_trainable(model, "default")
    model.gradient_checkpointing = True
    if sharded:
        shard_model(model, param_dtype=torch.bfloat16 if bf16 else None)
    free(device)
    return model.train()


def measure(
    model: torch.nn.Module,
    device: torch.device,
    *,
    batch: int,
    seq: int,
    steps: int,
    warmup: int,
    world: int,
    bf16: bool,
) -> dict[str, Any]:
    """The Trainer's step (autocast, loss without full logits, backward, clip, fused AdamW), timed."""
    from llamaforge.core.evaluate import autocast

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
    gen = torch.Generator().manual_seed(dist.get_rank() if dist.is_initialized() else 0)
    vocab = model.spec.vocab_size
    data = torch.randint(0, vocab, (batch, seq + 1), generator=gen).to(device)
    inputs, targets = data[:, :-1], data[:, 1:]
    ctx = (lambda: autocast(device, torch.bfloat16)) if bf16 else nullcontext
    start = 0.0
    loss = torch.zeros(())
    for i in range(warmup + steps):
        if i == warmup:
            sync(device)
            start = time.perf_counter()
        with ctx():
            loss = model(inputs, targets, return_logits=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    sync(device)
    seconds = time.perf_counter() - start
    tokens = steps * batch * seq * world
    trainable = sum(p.numel() for p in params)
    del opt
    return {
        "tokens_per_s": tokens / seconds,
        "tokens_per_s_per_gpu": tokens / seconds / world,
        "step_s": seconds / steps,
        "loss": float(loss.detach().float()),
        "params": build_model(model.spec, device="meta").num_parameters(),  # of the unquantized spec
        "trainable": trainable,
    }


def run_single(fn, device: torch.device) -> tuple[dict[str, Any] | None, str]:
    """Rank 0 runs `fn` alone (the other ranks wait); an out-of-memory error is a result, not a crash."""
    result, status = None, "ok"
    if not dist.is_initialized() or dist.get_rank() == 0:
        free(device)
        try:
            result = fn()
            peak = peak_gib(device)
            if peak is not None:
                result["peak_gib_per_gpu"] = [round(peak, 2)]
        except torch.OutOfMemoryError as exc:
            status = f"OOM ({str(exc).splitlines()[0][:120]})"
        free(device)
    barrier()
    return result, status


def run_all(fn, device: torch.device) -> dict[str, Any]:
    free(device)
    result = fn()
    peak = peak_gib(device)
    peaks: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(peaks, round(peak, 2) if peak is not None else None)
    if peak is not None:
        result["peak_gib_per_gpu"] = peaks
    free(device)
    return result


def main() -> None:
    args = parse_args()
    info = init_distributed(args.device)
    if not info.distributed:
        raise SystemExit("run under torchrun with 2 or more processes: torchrun --nproc-per-node 2 " + __file__)
    device = torch.device("cuda" if args.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    bf16 = device.type == "cuda"
    world = info.world_size
    phases = {p.strip() for p in args.phases.split(",") if p.strip()}
    rows: list[dict[str, Any]] = []
    common = dict(seq=args.seq_len, steps=args.steps, warmup=args.warmup, bf16=bf16)

    def record(row: dict[str, Any], result: dict[str, Any] | None, status: str = "ok") -> None:
        row["status"] = status
        if result:
            row.update(result)
        rows.append(row)
        if info.is_main:
            shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}
            print(json.dumps(shown), flush=True)

    if "1b" in phases:
        s, b = args.spec_small, args.batch_small

        def one():
            model = full_model(s, device, sharded=False, ac=False, bf16=bf16)
            return measure(model, device, batch=b, world=1, **common)

        result, status = run_single(one, device)
        record(Phase("1b", 1, s, b, args.seq_len, "plain (no FSDP), as `llamaforge train`").row, result, status)

        def many():
            model = full_model(s, device, sharded=True, ac=False, bf16=bf16)
            return measure(model, device, batch=b, world=world, **common)

        row = Phase("1b", world, s, b, args.seq_len, "FSDP2 (bf16 params on GPU, fp32 reduce)").row
        record(row, run_all(many, device))

    if "8b" in phases:
        s, b = args.spec_large, args.batch_large
        if not args.no_single_8b:

            def one8():
                model = full_model(s, device, sharded=False, ac=True, bf16=bf16)
                return measure(model, device, batch=b, world=1, **common)

            result, status = run_single(one8, device)
            record(Phase("8b", 1, s, b, args.seq_len, "plain, full AdamW").row, result, status)

        def many8():
            model = full_model(s, device, sharded=True, ac=True, bf16=bf16)
            return measure(model, device, batch=b, world=world, **common)

        row = Phase("8b", world, s, b, args.seq_len, "FSDP2, full AdamW, activation checkpointing").row
        record(row, run_all(many8, device))

    if "qlora" in phases:
        s, b = args.spec_large, args.batch_qlora

        def oneq():
            model = qlora_model(s, device, sharded=False, rank=args.lora_rank, bf16=bf16)
            return measure(model, device, batch=b, world=1, **common)

        result, status = run_single(oneq, device)
        record(Phase("qlora", 1, s, b, args.seq_len, f"NF4 base, LoRA r={args.lora_rank}").row, result, status)

        def manyq():
            model = qlora_model(s, device, sharded=True, rank=args.lora_rank, bf16=bf16)
            return measure(model, device, batch=b, world=world, **common)

        row = Phase("qlora", world, s, b, args.seq_len, "FSDP2, NF4 base sharded, LoRA trained").row
        record(row, run_all(manyq, device))

    if info.is_main:
        print_summary(rows, world, device)
        if args.json:
            meta = {
                "date": datetime.now(UTC).isoformat(timespec="seconds"),
                "torch": torch.__version__,
                "llamaforge": getattr(llamaforge, "__version__", "dev"),
                "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
                "world_size": world,
                "args": vars(args),
            }
            with open(args.json, "w", encoding="utf-8") as fh:
                json.dump({"meta": meta, "rows": rows}, fh, indent=2)
    shutdown()


def print_summary(rows: list[dict[str, Any]], world: int, device: torch.device) -> None:
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (gloo)"
    print(f"\nFSDP2 scaling on {world} x {name}, torch {torch.__version__}")
    header = f"{'phase':6} {'gpus':>4} {'spec':14} {'batch':>5} {'tokens/s':>11} {'per GPU':>9} "
    header += f"{'peak GiB/GPU':>14}  status"
    print(header)
    print("-" * len(header))
    for r in rows:
        tps = f"{r['tokens_per_s']:,.0f}" if "tokens_per_s" in r else "-"
        per = f"{r['tokens_per_s_per_gpu']:,.0f}" if "tokens_per_s_per_gpu" in r else "-"
        peaks = r.get("peak_gib_per_gpu")
        peak = "/".join(f"{p:.1f}" for p in peaks if p is not None) if peaks else "-"
        print(
            f"{r['phase']:6} {r['gpus']:>4} {r['spec']:14} {r['batch_per_gpu']:>5} {tps:>11} {per:>9} {peak:>14}  "
            f"{r['status']}; {r['note']}"
        )
    for phase in ("1b", "qlora"):
        one = next((r for r in rows if r["phase"] == phase and r["gpus"] == 1 and "tokens_per_s" in r), None)
        many = next((r for r in rows if r["phase"] == phase and r["gpus"] == world and "tokens_per_s" in r), None)
        if one and many:
            ratio = many["tokens_per_s"] / one["tokens_per_s"]
            target = 0.9 * world
            verdict = "meets" if ratio >= target else "BELOW"
            print(f"{phase}: {world}-GPU / 1-GPU tokens/s = {ratio:.2f}x ({verdict} the {target:.1f}x target)")
    for r in (r for r in rows if r["phase"] == "8b"):
        params = build_model(load_spec(r["spec"]), device="meta").num_parameters()
        state = params * 16 / GIB  # fp32 weights, grads, AdamW exp_avg and exp_avg_sq
        print(
            f"8b on {r['gpus']} GPU(s): {params:,} parameters, fp32 weights+grads+AdamW = {state:.0f} GiB in all, "
            f"{state / r['gpus']:.0f} GiB per GPU before activations; {r['status']}"
        )


if __name__ == "__main__":
    main()
