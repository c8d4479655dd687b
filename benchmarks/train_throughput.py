"""Training throughput: llamaforge against transformers `LlamaForCausalLM`, side by side in one process.

    python benchmarks/train_throughput.py                 # CPU: the `tiny` spec, fp32, eager
    python benchmarks/train_throughput.py --gpu           # CUDA: ~125M Llama-3-shaped model, bf16 autocast,
                                                          # torch.compile for both, batch 16 x 1024
    python benchmarks/train_throughput.py --gpu --json out.json

Both sides train the same architecture from the same initial weights (transformers loads llamaforge's state dict:
the parameter names are the same) on the same pre-generated batches with the same optimizer (AdamW, fused on
CUDA), gradient clipping and precision. A step is forward + loss + backward + clip + optimizer step + zero_grad.
llamaforge computes its loss with the chunked fused cross-entropy (`return_logits=False`); transformers computes
its usual full-logits loss. Timing windows are bracketed by CUDA synchronisation; nothing syncs inside them.
Windows alternate between the two models (`--rounds`), and the median window is reported, so drift in clock or
neighbour load hits both sides alike. MFU uses 6N + 12·L·d·T FLOPs per token (N: parameters in matmuls,
embedding lookup excluded) against the device's dense bf16 peak (or `--peak-tflops`).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from typing import Any

import torch
from _timing import kernel_table, sync  # benchmarks/ is on sys.path when run as a script
from _variants import VariantError, inductor_options, parse_settings

import llamaforge

GPU_SPEC: dict[str, Any] = {
    "name": "bench-125m",
    "vocab_size": 32000,
    "dim": 768,
    "n_layers": 12,
    "n_heads": 12,
    "n_kv_heads": 4,
    "ffn_hidden": 2048,
    "max_positions": 1024,
    "rope_theta": 500000.0,
    "tie_embeddings": False,
}
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0}


def hf_twin(model: Any, attn: str) -> Any:
    """A transformers LlamaForCausalLM with the same config and the same weights."""
    import transformers

    from llamaforge.core.hf_config import hf_config_from_spec

    cfg = transformers.LlamaConfig(**hf_config_from_spec(model.spec))
    cfg._attn_implementation = attn
    with torch.device(model.device):
        hf = transformers.LlamaForCausalLM(cfg).to(torch.float32)
    state = {k: v for k, v in model.state_dict().items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    bad = [k for k in missing if "rotary" not in k and not (k == "lm_head.weight" and model.spec.tie_embeddings)]
    if bad or unexpected:
        raise RuntimeError(f"state dicts differ: missing {bad[:5]}, unexpected {list(unexpected)[:5]}")
    if model.spec.tie_embeddings:
        hf.tie_weights()
    return hf.train()


def matmul_params(model: torch.nn.Module) -> int:
    """Parameters that take part in matmuls (embedding lookup excluded; a tied head counted once as a matmul)."""
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else model.model.embed_tokens
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
    tied = getattr(getattr(model, "lm_head", None), "weight", None) is embed.weight
    return total - (0 if tied else embed.weight.numel())


def flops_per_token(spec: Any, n_matmul: int, seq: int) -> float:
    return 6.0 * n_matmul + 12.0 * spec.n_layers * spec.n_heads * spec.head_size * seq


def make_step(
    model: Any,
    forward: Any,
    kind: str,
    device: torch.device,
    amp: torch.dtype | None,
    lr: float,
    compile_optimizer: bool = False,
    graphed: bool = False,
):
    """One training step. llamaforge's optimizer and update are the trainer's own (AdamW built as `Trainer` does
    it; clipping folded into the fused update); transformers gets what its Trainer runs: a fused AdamW with weight
    decay on every parameter after `clip_grad_norm_`."""
    from llamaforge.core.train import build_optimizer, make_update

    params = [p for p in model.parameters() if p.requires_grad]
    if kind == "llamaforge":
        opt = build_optimizer(params, lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, device=device,
                              compiled=compile_optimizer)  # fmt: skip
    else:
        opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.1, fused=device.type == "cuda")
    if kind == "llamaforge":
        update = make_update(params, opt, 1.0, compiled=compile_optimizer)
    else:

        def update() -> None:
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if graphed:  # as the trainer does: the last step's graph outputs may be overwritten from here on
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            if kind == "llamaforge":
                loss = forward(x, y, return_logits=False).loss
            else:
                loss = forward(input_ids=x, labels=x).loss
        loss.backward()
        update()
        return loss.detach()

    return step


def window(
    step: Any, batches: list[tuple[torch.Tensor, torch.Tensor]], n: int, device: torch.device
) -> tuple[float, float | None]:
    """Seconds for `n` steps and, on CUDA, the host's own seconds to issue them (None on a CPU, where the two are
    one): when the host's time is close to the GPU's, the step is bound by launching work."""
    sync(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        start.record()
        for i in range(n):
            step(*batches[i % len(batches)])
        end.record()
        host = time.perf_counter() - t0
        end.synchronize()
        return start.elapsed_time(end) / 1000.0, host
    t0 = time.perf_counter()
    for i in range(n):
        step(*batches[i % len(batches)])
    return time.perf_counter() - t0, None


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu", action="store_true", help="CUDA, ~125M config, bf16 autocast, torch.compile")
    ap.add_argument("--spec", default=None, help="model spec (default: tiny on CPU, the 125M config on --gpu)")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None, help="steps per timing window")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (compilation happens here)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating timing windows per model (median kept)")
    ap.add_argument("--compile", dest="compile", action="store_true", default=None)
    ap.add_argument("--no-compile", dest="compile", action="store_false")
    ap.add_argument("--no-hf-eager", action="store_true", help="on --gpu, skip the extra transformers eager run")
    ap.add_argument("--hf-cudagraphs", action="store_true",
                    help="also transformers+compile with CUDA graphs (llamaforge's default on CUDA)")  # fmt: skip
    ap.add_argument("--attn", default="sdpa", help="transformers attn_implementation (sdpa, eager, flash_attention_2)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: known GPUs)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="STEPS",
        help="after timing, the kernel table of each llamaforge contender over this many steps",
    )
    ap.add_argument("--variant", action="append", default=[], metavar="SETTINGS",
                    help="one more llamaforge contender, same weights and batches, e.g. compile_optimizer=1 or "
                         "inductor.triton.enable_pdl=1 (repeatable; timed in the same alternating windows)",
                    )  # fmt: skip
    args = ap.parse_args(argv)
    try:
        variants = {}
        for text in args.variant:
            settings = parse_settings(text, {"compile_optimizer": "bool"})
            variants[f"llamaforge[{text}]"] = (settings, inductor_options(settings))
    except VariantError as exc:
        ap.error(str(exc))

    gpu = args.gpu
    if gpu and not torch.cuda.is_available():
        raise SystemExit("--gpu needs CUDA, and torch.cuda.is_available() is False")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if gpu else "cpu")
    spec = llamaforge.load_spec(args.spec or (GPU_SPEC if gpu else "tiny"))
    batch = args.batch or (16 if gpu else 8)
    seq = args.seq or (1024 if gpu else 128)
    steps = args.steps or (20 if gpu else 5)
    warmup = args.warmup if args.warmup is not None else (10 if gpu else 2)
    compile_ = args.compile if args.compile is not None else gpu
    amp = torch.bfloat16 if gpu else None
    spec = spec.with_updates(max_positions=max(spec.max_positions, seq), dropout=0.0)
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    ours = llamaforge.build_model(spec, device=device, dtype="float32", seed=0).train()
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(4):
        block = torch.randint(0, spec.vocab_size, (batch, seq + 1), generator=g)
        batches.append((block[:, :-1].contiguous().to(device), block[:, 1:].contiguous().to(device)))
    hf = hf_twin(ours, args.attn)
    n_matmul = matmul_params(ours)
    fpt = flops_per_token(spec, n_matmul, seq)
    peak = args.peak_tflops
    if peak is None and gpu:
        name = torch.cuda.get_device_name(device)
        peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)

    contenders: dict[str, Any] = {}
    from llamaforge.core.train import compile_for_training  # the trainer's own torch.compile settings

    # the trainer's default (TrainSpec.cuda_graphs unset): compiled steps on CUDA replay as CUDA graphs; a variant
    # with inductor.triton.cudagraphs=0 times the step without them
    graphs = {"triton.cudagraphs": True} if compile_ and device.type == "cuda" else {}
    contenders["llamaforge"] = make_step(ours, compile_for_training(ours, graphs) if compile_ else ours, "llamaforge",
                                         device, amp, 3e-4, graphed=bool(graphs))  # fmt: skip
    for label, (settings, options) in variants.items():
        twin = llamaforge.build_model(spec, device=device, dtype="float32", seed=0).train()
        if options and not compile_:
            ap.error(f"--variant {label}: inductor options need --compile")
        options = {**graphs, **options}
        forward = compile_for_training(twin, options) if compile_ else twin
        contenders[label] = make_step(twin, forward, "llamaforge", device, amp, 3e-4,
                                      compile_optimizer=settings.get("compile_optimizer", False),
                                      graphed=bool(options.get("triton.cudagraphs")))  # fmt: skip
    hf_label = "transformers" + ("+compile" if compile_ else "")
    contenders[hf_label] = make_step(hf, torch.compile(hf) if compile_ else hf, "hf", device, amp, 3e-4)
    if args.hf_cudagraphs:  # what a transformers user gets from CUDA graphs too (the ratio stays against plain)
        if not (compile_ and device.type == "cuda"):
            ap.error("--hf-cudagraphs needs CUDA and compile")
        hf_graphed = hf_twin(ours, args.attn)
        contenders["transformers+compile+cudagraphs"] = make_step(
            hf_graphed, torch.compile(hf_graphed, options={"triton.cudagraphs": True}), "hf", device, amp, 3e-4,
            graphed=True,
        )  # fmt: skip
    if gpu and compile_ and not args.no_hf_eager:
        hf_eager = hf_twin(ours, args.attn)
        contenders["transformers (eager)"] = make_step(hf_eager, hf_eager, "hf", device, amp, 3e-4)

    compile_s: dict[str, float] = {}
    first_loss: dict[str, float] = {}
    failed: dict[str, str] = {}
    for label, step in list(contenders.items()):
        t0 = time.perf_counter()
        try:
            first_loss[label] = float(step(*batches[0]))
            for i in range(max(0, warmup - 1)):
                step(*batches[(i + 1) % len(batches)])
            sync(device)
        except Exception as exc:  # report the failure and still measure the others
            failed[label] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            print(f"  {label} failed during warm-up: {failed[label]}")
            del contenders[label]
            continue
        compile_s[label] = time.perf_counter() - t0
    if "llamaforge" not in contenders or not any(not k.startswith("llamaforge") for k in contenders):
        raise SystemExit(f"SUMMARY train_throughput: FAILED {failed}")
    times: dict[str, list[float]] = {k: [] for k in contenders}
    host_times: dict[str, list[float]] = {k: [] for k in contenders}
    for _ in range(args.rounds):
        for label, step in contenders.items():
            secs, host = window(step, batches, steps, device)
            times[label].append(secs)
            if host is not None:
                host_times[label].append(host)

    profiles = {}
    for label, step in contenders.items():
        if args.profile and label.startswith("llamaforge"):
            profiles[label] = kernel_table(lambda step=step: step(*batches[0]), device, args.profile, top=30)

    tokens = steps * batch * seq
    results: dict[str, Any] = {}
    for label in contenders:
        secs = statistics.median(times[label])
        tps = tokens / secs
        results[label] = {
            "tokens_per_s": tps,
            "step_ms": 1000 * secs / steps,
            "tflops": tps * fpt / 1e12,
            "mfu": (tps * fpt / 1e12) / peak if peak else None,
            "warmup_s": compile_s[label],
            "first_loss": first_loss[label],
        }
        if host_times[label]:
            results[label]["host_ms_per_step"] = 1000 * statistics.median(host_times[label]) / steps
    if gpu:
        results["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    ref = hf_label if hf_label in contenders else next(k for k in contenders if not k.startswith("llamaforge"))
    ratio = results["llamaforge"]["tokens_per_s"] / results[ref]["tokens_per_s"]
    for label in contenders:
        results[label]["ratio_vs_reference"] = results[label]["tokens_per_s"] / results[ref]["tokens_per_s"]
    summary = {
        "device": torch.cuda.get_device_name(device)
        if gpu
        else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "spec": spec.name or args.spec or "tiny",
        "params": ours.num_parameters(),
        "batch": batch,
        "seq": seq,
        "precision": "bf16 autocast" if amp else "fp32",
        "compile": compile_,
        "steps_per_window": steps,
        "rounds": args.rounds,
        "flops_per_token": fpt,
        "peak_tflops": peak,
        "results": results,
        "failed": failed,
        "ratio_vs_" + ref: ratio,
        "profiles": profiles,
    }
    print(f"device {summary['device']}, torch {torch.__version__}, {summary['params']:,} parameters, batch {batch} x "
          f"seq {seq}, {summary['precision']}, compile={compile_}")  # fmt: skip
    for label in contenders:
        r = results[label]
        mfu = f", MFU {100 * r['mfu']:.1f}%" if r["mfu"] is not None else ""
        host = f", host {r['host_ms_per_step']:.1f} ms/step" if "host_ms_per_step" in r else ""
        ratio_txt = f"{r['ratio_vs_reference']:.3f}x"
        extra = f"(first loss {r['first_loss']:.4f}, warm-up {r['warmup_s']:.1f} s, {ratio_txt}{host})"
        print(f"  {label:<22} {r['tokens_per_s']:>12,.0f} tokens/s  {r['step_ms']:8.1f} ms/step  "
              f"{r['tflops']:7.2f} TFLOP/s{mfu}  {extra}")  # fmt: skip
    for label, table in profiles.items():
        print(f"  {label}: {table['kernel_us_per_step'] / 1000:.1f} ms of kernels per step "
              f"({table['kernels_per_step']:.0f} kernels); the largest:")  # fmt: skip
        for row in table["kernels"][:12]:
            print(f"    {row['us_per_step']:9.1f} us  x{row['calls_per_step']:<5g} {row['name'][:100]}")
        if "idle_us_per_step" in table:
            print(f"  idle between kernels: {table['idle_us_per_step']:.1f} us per step of a "
                  f"{table['span_us_per_step']:.1f} us span; gaps {table['gaps']}")  # fmt: skip
            for gap in table["largest_gaps"][:8]:
                print(f"    gap {gap['us']:8.1f} us after {gap['after'][:50]} before {gap['before'][:50]}")
            for op in table["ops"][:15]:
                calls = op["calls_per_step"]
                print(f"    {op['us_per_step']:9.1f} us  x{calls:<5g} {op['op'][:40]} {op['shapes'][:70]}")
    ours_r = results["llamaforge"]
    mfu_txt = f", MFU {100 * ours_r['mfu']:.1f}% vs {100 * results[ref]['mfu']:.1f}%" if ours_r["mfu"] else ""
    print(f"SUMMARY train_throughput: llamaforge {ours_r['tokens_per_s']:,.0f} tokens/s vs {ref} "
          f"{results[ref]['tokens_per_s']:,.0f} tokens/s = {ratio:.2f}x{mfu_txt}")  # fmt: skip
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(summary, fh, indent=2)
    return summary


if __name__ == "__main__":
    main()
