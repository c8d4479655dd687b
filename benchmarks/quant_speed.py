"""Speed of quantized models against the unquantized model, measured side by side in one run.

    python benchmarks/quant_speed.py                  # CPU: fp32 vs int8_dynamic / int8_weight_only,
                                                      #      prefill and decode tokens/s
    python benchmarks/quant_speed.py --compile --spec 100m  # CPU through generate(compile=True)
    python benchmarks/quant_speed.py --gpu            # CUDA: llama3.2-1b shape, bf16 vs int8_weight_only decode
                                                      #       tokens/s through llamaforge.generate (target >= 1.3x)
    python benchmarks/quant_speed.py --gpu --int8-gemv  # also int8 through llamaforge's Triton GEMV kernel

CPU mode: every variant decodes the same prompt greedily with a static KV cache, eagerly; decode tokens/s = new
tokens / wall time of the decode loop (prefill excluded); prefill tokens/s = prompt tokens / wall time of one
forward over the prompt. With --compile the CPU mode goes through `llamaforge.generate(compile=True)` instead:
prefill = a one-token generate, decode = the extra time of new tokens beyond that one. GPU mode decodes through
`llamaforge.generate`, the path the CLI and the server use (compiled one-token step, CUDA graph): decode tokens/s
comes from timing the captured steps alone, after every variant is built, in turns (`--rounds` windows each, the
best kept), so drift over the run does not land on one side of the ratio; generate tokens/s is end to end with
prefill. The GPU mode also runs
torchao's `quantize_(model, Int8WeightOnlyConfig())` on the same bf16 model through the same path as a reference
column when torchao is installed (it says so when it is not).
Weights are random (speed does not depend on their values); the best of `--repeats` timed runs after a warm-up
(which includes compilation) counts.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from typing import Any

import torch
from _timing import best_time, best_times_interleaved, stored_weight_bytes  # benchmarks/ on sys.path

import llamaforge
from llamaforge.core.loading import apply_transform

CPU_SPEC: dict[str, Any] = {  # ~30M parameters: big enough for matmuls to dominate, small enough for 2 cores
    "vocab_size": 8192,
    "dim": 512,
    "n_layers": 8,
    "n_heads": 8,
    "n_kv_heads": 4,
    "ffn_hidden": 1536,
    "max_positions": 1024,
    "rope_theta": 500000.0,
    "tie_embeddings": True,
}


def _prompts(model: Any, batch: int, prompt_len: int) -> torch.Tensor:
    """The same random prompt ids for every variant and mode (seeded)."""
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, model.spec.vocab_size, (batch, prompt_len), generator=g)


class Decoder:
    """CPU mode: eager prefill, then greedy one-token steps over a static cache, so prefill and decode are timed
    apart (the GPU mode times `llamaforge.generate` instead)."""

    def __init__(self, model: Any, batch: int, prompt_len: int, new_tokens: int) -> None:
        self.model, self.prompt_len, self.new_tokens = model, prompt_len, new_tokens
        self.device = model.device
        self.cache = model.new_cache(batch, prompt_len + new_tokens)
        self.prompt = _prompts(model, batch, prompt_len).to(self.device)
        self.positions = [torch.tensor([prompt_len + i], device=self.device) for i in range(new_tokens)]

    def step(self, tok: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        logits = self.model(tok, cache=self.cache, cache_position=pos).logits
        return logits[:, -1].argmax(-1, keepdim=True)

    @torch.no_grad()
    def prefill(self) -> torch.Tensor:
        pos = torch.arange(self.prompt_len, device=self.device)
        logits = self.model(self.prompt, cache=self.cache, cache_position=pos, logits_to_keep=1).logits
        return logits[:, -1].argmax(-1, keepdim=True)

    @torch.no_grad()
    def decode(self, first: torch.Tensor) -> list[int]:
        tok, out = first, []
        for pos in self.positions[:-1]:
            tok = self.step(tok, pos)
            out.append(tok)
        return torch.cat(out, dim=1)[0].tolist() if out else []


def measure(model: Any, args: argparse.Namespace) -> dict[str, Any]:
    dec = Decoder(model, args.batch, args.prompt_len, args.new_tokens)
    prefill_s = best_time(dec.prefill, dec.device, args.repeats)
    first = dec.prefill()
    tokens: list[int] = []

    def run() -> None:
        tokens[:] = dec.decode(first)

    decode_s = best_time(run, dec.device, args.repeats)
    steps = max(1, args.new_tokens - 1)
    return {
        "prefill_tokens_per_s": args.batch * args.prompt_len / prefill_s,
        "decode_tokens_per_s": args.batch * steps / decode_s,
        "decode_ms_per_token": 1000 * decode_s / steps,
        "tokens": tokens[:8],
    }


def measure_compiled(model: Any, args: argparse.Namespace) -> dict[str, Any]:
    """CPU mode with --compile: through `llamaforge.generate(compile=True)`, the path the CLI and server take.
    Prefill is timed as a one-token generate; decode as the extra time of `new_tokens` over that one token."""
    from llamaforge.core.generation import GenerationConfig, generate

    prompts = _prompts(model, args.batch, args.prompt_len).tolist()
    full = GenerationConfig(max_new_tokens=args.new_tokens, eos_token_ids=[], compile=True)
    one = GenerationConfig(max_new_tokens=1, eos_token_ids=[], compile=True)
    out: list[list[int]] = []

    def run_full() -> None:
        out[:] = generate(model, prompts, full)

    def run_one() -> None:
        generate(model, prompts, one)

    t0 = time.perf_counter()
    run_full()  # compilation
    first_s = time.perf_counter() - t0
    full_s = best_time(run_full, model.device, args.repeats)
    one_s = best_time(run_one, model.device, args.repeats)
    steps = max(1, args.new_tokens - 1)
    decode_s = max(full_s - one_s, 1e-9)
    return {
        "first_call_s": round(first_s, 1),
        "prefill_tokens_per_s": args.batch * args.prompt_len / one_s,
        "decode_tokens_per_s": args.batch * steps / decode_s,
        "decode_ms_per_token": 1000 * decode_s / steps,
        "generate_tokens_per_s": args.batch * args.new_tokens / full_s,
        "tokens": out[0][:8],
    }


def run_cpu(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    from generate_throughput import SPECS  # benchmarks/ is on sys.path when run as a script

    spec = llamaforge.load_spec(SPECS.get(args.spec, args.spec) if args.spec else CPU_SPEC)
    base = llamaforge.build_model(spec, seed=0, dtype="float32").eval()
    timed = measure_compiled if args.compile else measure
    rows = {"fp32": timed(base, args)}
    for method in args.methods:
        q = apply_transform(copy.deepcopy(base), "quantizer", method)
        rows[method] = timed(q, args)
        torch._dynamo.reset()
    for r in rows.values():
        r["prefill_vs_fp32"] = r["prefill_tokens_per_s"] / rows["fp32"]["prefill_tokens_per_s"]
        r["decode_vs_fp32"] = r["decode_tokens_per_s"] / rows["fp32"]["decode_tokens_per_s"]
    decoding = "llamaforge.generate(compile=True)" if args.compile else "eager prefill + eager one-token steps"
    return {"mode": "cpu", "params": base.num_parameters(), "threads": args.threads, "decoding": decoding,
            "results": rows}  # fmt: skip


def _torchao_int8_weight_only(model: Any) -> Any:
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    quantize_(model, Int8WeightOnlyConfig())
    return model


def measure_generate(model: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Decode through `llamaforge.generate`, the path every command uses (compiled one-token step with the
    row-times-weight GEMV pass, replayed as a CUDA graph). End-to-end tokens/s includes prefill; the graph step
    alone (timed with CUDA events) is the decode speed."""
    from generate_throughput import _step_profile  # benchmarks/ is on sys.path when run as a script

    from llamaforge.core.generation import GenerationConfig, generate

    prompts = _prompts(model, args.batch, args.prompt_len).tolist()
    config = GenerationConfig(max_new_tokens=args.new_tokens, eos_token_ids=[])
    out: list[list[int]] = []

    def run() -> None:
        out[:] = generate(model, prompts, config)

    t0 = time.perf_counter()
    run()  # compilation and graph capture
    first_s = time.perf_counter() - t0
    total_s = best_time(run, model.device, args.repeats)
    with torch.inference_mode():
        prof = _step_profile(model, model.device, args.new_tokens)
    row = {
        "first_call_s": round(first_s, 1),
        "generate_tokens_per_s": args.batch * args.new_tokens / total_s,
        "tokens": out[0][:8],
    }
    if prof.get("graph"):
        row["decode_ms_per_token"] = prof["graph_step_ms"]
        row["decode_tokens_per_s"] = args.batch * 1000.0 / prof["graph_step_ms"]
    return row


def interleave_steps(
    rows: dict[str, Any], kept: dict[str, Any], *, steps: int, rounds: int, device: torch.device
) -> None:
    """Time every variant's captured decode step again, in turns (A B C A B C ...), and make the best of those
    windows each variant's decode figure. Why: one window per variant, each right after its own compilation, let the
    GPU's drift land on one side of the ratio (on an H200 the same int8 step measured 0.850 and 0.952 ms minutes
    apart in one invocation). The first window stays in the row as `decode_ms_alone`."""
    import generate_throughput  # benchmarks/ is on sys.path when run as a script

    found = {name: generate_throughput.graph_window(model, steps) for name, model in kept.items()}
    found = {name: f for name, f in found.items() if f is not None}
    if not found:
        return
    seconds = best_times_interleaved([f[0] for f in found.values()], device, rounds)
    for (name, (_, n, bsz)), s in zip(found.items(), seconds, strict=True):
        row = rows[name]
        row["decode_ms_alone"] = row.get("decode_ms_per_token")
        row["decode_ms_per_token"] = round(1000.0 * s / n, 4)
        row["decode_tokens_per_s"] = bsz * n / s
        row["decode_timing"] = f"best of {rounds} interleaved windows of {n} graph replays"


def run_gpu(args: argparse.Namespace) -> dict[str, Any]:
    if not torch.cuda.is_available():
        raise SystemExit("--gpu needs a CUDA device; torch.cuda.is_available() is False on this machine")
    device = torch.device("cuda")
    spec = llamaforge.load_spec(args.spec or "llama3.2-1b").with_updates(eos_token_id=None)
    base = llamaforge.build_model(spec, device=device, seed=0, dtype="bfloat16").eval()
    rows: dict[str, Any] = {}
    kept: dict[str, Any] = {}  # each variant's model, so its captured step can be timed again at the end

    def attempt(name: str, build) -> None:
        try:
            model = build()
            rows[name] = {"weight_bytes": stored_weight_bytes(model), **measure_generate(model, args)}
            kept[name] = model
        except Exception as exc:  # report and keep going: one failing variant must not hide the others
            rows[name] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
            print(f"[{name}] failed: {rows[name]['error']}", flush=True)
        print(name, json.dumps(rows[name]), flush=True)
        torch._dynamo.reset()
        torch.cuda.empty_cache()

    attempt("bf16", lambda: base)
    attempt("int8_weight_only", lambda: apply_transform(copy.deepcopy(base), "quantizer", "int8_weight_only"))
    if args.int8_gemv:  # the same int8 model with its one-row products on llamaforge's Triton GEMV kernel
        from llamaforge.kernels import row_gemv

        was, row_gemv.INT8 = row_gemv.INT8, True  # read when the decode step is traced: on for this whole variant
        try:
            attempt(
                "int8_weight_only (row_gemv kernel)",
                lambda: apply_transform(copy.deepcopy(base), "quantizer", "int8_weight_only"),
            )
        finally:
            row_gemv.INT8 = was
    if args.linears_only:
        attempt(
            "int8_weight_only (linears only, bf16 table)",
            lambda: apply_transform(copy.deepcopy(base), "quantizer", "int8_weight_only", embeddings=False),
        )
    if args.torchao:
        try:
            import torchao

            rows["torchao_version"] = torchao.__version__
            attempt("torchao Int8WeightOnlyConfig", lambda: _torchao_int8_weight_only(copy.deepcopy(base)))
        except ImportError:
            print(
                "torchao is not installed, so the torchao reference column is skipped (the llamaforge columns do not "
                "need it). To include it, install a torchao wheel matching this torch, e.g. pip install torchao",
                flush=True,
            )
            rows["torchao"] = "not installed"
    interleave_steps(rows, kept, steps=args.new_tokens, rounds=args.rounds, device=device)
    ref = rows.get("bf16", {}).get("decode_tokens_per_s")
    for r in rows.values():
        if isinstance(r, dict) and ref and "decode_tokens_per_s" in r:
            r["decode_vs_bf16"] = r["decode_tokens_per_s"] / ref
            r["generate_vs_bf16"] = r["generate_tokens_per_s"] / rows["bf16"]["generate_tokens_per_s"]
    return {
        "mode": "gpu",
        "device": torch.cuda.get_device_name(device),
        "spec": args.spec or "llama3.2-1b",
        "params": base.num_parameters(),
        "decoding": "llamaforge.generate (compiled step, CUDA graph)",
        "results": rows,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu", action="store_true", help="CUDA mode: bf16 vs int8 weight-only decode (llama3.2-1b).")
    p.add_argument("--spec", default=None, help="Spec (preset, file or 100m); default: ~30M on CPU, llama3.2-1b GPU.")
    p.add_argument("--methods", nargs="+", default=["int8_dynamic", "int8_weight_only"], help="CPU mode quantizers.")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=None, help="Prompt tokens (default 128 CPU, 16 GPU).")
    p.add_argument("--new-tokens", type=int, default=None, help="Decoded tokens (default 32 CPU, 256 GPU).")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rounds", type=int, default=5, help="GPU mode: interleaved timing rounds of the decode steps.")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (CPU mode).")
    p.add_argument("--linears-only", action="store_true", help="GPU mode: also int8 linears with a bf16 table.")
    p.add_argument("--int8-gemv", action="store_true", help="GPU mode: also int8 through the Triton GEMV kernel.")
    p.add_argument("--no-torchao", dest="torchao", action="store_false", help="GPU mode: skip the torchao column.")
    p.add_argument("--compile", action="store_true", help="CPU mode: time llamaforge.generate(compile=True).")
    p.add_argument("--json", default=None, help="Also write the results to this file.")
    args = p.parse_args()
    args.prompt_len = args.prompt_len or (16 if args.gpu else 128)
    args.new_tokens = args.new_tokens or (256 if args.gpu else 32)

    result = run_gpu(args) if args.gpu else run_cpu(args)
    result.update({"torch": torch.__version__, "python": platform.python_version(), "batch": args.batch})
    result.update({"prompt_len": args.prompt_len, "new_tokens": args.new_tokens})
    ref_name = "bf16" if args.gpu else "fp32"
    print(f"\n{result['mode']} | {result['params']:,} parameters | torch {torch.__version__}")
    first_col = "generate tok/s" if args.gpu else "prefill tok/s"
    print(f"{'variant':<45} {first_col:>14} {'decode tok/s':>13} {'decode vs ' + ref_name:>15}")
    for name, r in result["results"].items():
        if not isinstance(r, dict):
            continue
        if "error" in r:
            print(f"{name:<45} failed: {r['error'][:80]}")
            continue
        vs = r.get("decode_vs_fp32", r.get("decode_vs_bf16"))
        first = r.get("prefill_tokens_per_s", r.get("generate_tokens_per_s", float("nan")))
        print(f"{name:<45} {first:>14,.0f} {r.get('decode_tokens_per_s', float('nan')):>13,.1f} {vs or 0:>14.2f}x")
    if args.gpu:
        r = result["results"].get("int8_weight_only", {})
        if "decode_vs_bf16" in r:
            verdict = "meets" if r["decode_vs_bf16"] >= 1.3 else "MISSES"
            print(f"\nint8_weight_only decode is {r['decode_vs_bf16']:.2f}x bf16: {verdict} the >= 1.3x target")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
