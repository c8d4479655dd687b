"""Decoding throughput: llamaforge `generate` against transformers `generate`, same weights, same run.

    python benchmarks/generate_throughput.py                       # CPU: tiny and a ~100M spec, batch 1
    python benchmarks/generate_throughput.py --device cuda --spec llama3.2-1b --dtype bfloat16 \
        --batch 1 8 32 --new-tokens 256 --json out.json

Both sides decode greedily with the same random weights (transformers reads llamaforge's state dict: the names
are the same), the same prompt and exactly `--new-tokens` new tokens (EOS disabled). Tokens/s counts generated
tokens over wall time including prefill, best of `--repeats` after a warm-up (which includes compilation); the two
sides' timed calls alternate (A B A B), so drift on a shared machine falls on both.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import UTC, datetime
from typing import Any

import torch
from _timing import best_time, best_times_interleaved, streamed_weight_bytes, sync  # benchmarks/ on sys.path

import llamaforge
from llamaforge.core.generation import GenerationConfig, generate

SPECS: dict[str, dict[str, Any]] = {
    "100m": {
        "vocab_size": 32000,
        "dim": 768,
        "n_layers": 12,
        "n_heads": 12,
        "n_kv_heads": 4,
        "ffn_hidden": 2048,
        "max_positions": 2048,
        "rope_theta": 500000.0,
        "tie_embeddings": True,
    },
}


CLOCK = time.perf_counter  # --clock process: CPU time of this process (fairer on a shared, loaded machine)


def _timed(fn, device: torch.device, repeats: int) -> float:
    return best_time(fn, device, repeats, clock=CLOCK)


def _hf_model(model: Any) -> Any:
    import transformers

    from llamaforge.core.hf_config import hf_config_from_spec

    cfg = transformers.LlamaConfig(**hf_config_from_spec(model.spec))
    with torch.device(model.device):
        hf = transformers.LlamaForCausalLM(cfg).to(model.dtype)
    missing, unexpected = hf.load_state_dict(model.state_dict(), strict=False)
    bad = [k for k in missing if "rotary" not in k] + list(unexpected)
    if bad:
        raise RuntimeError(f"state dicts differ: {bad[:5]}")
    hf.tie_weights()
    return hf.eval()


def bench(
    spec_name: str,
    *,
    device: str,
    dtype: str,
    batch: int,
    prompt_len: int,
    new_tokens: int,
    repeats: int,
    hf_static: bool,
    skip_hf: bool,
    compile: bool | None,
    prefill_graph: bool | None = None,
    attention_kernel: str | None = None,
) -> dict[str, Any]:
    spec = llamaforge.load_spec(SPECS.get(spec_name, spec_name))
    spec = spec.with_updates(eos_token_id=None, max_positions=max(spec.max_positions, prompt_len + new_tokens))
    if attention_kernel:
        spec = spec.with_updates(attention_kernel=attention_kernel)
    dev = torch.device(device)
    model = llamaforge.build_model(spec, device=dev, dtype=dtype, seed=0).eval()
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, spec.vocab_size, (batch, prompt_len), generator=g).tolist()
    config = GenerationConfig(max_new_tokens=new_tokens, eos_token_ids=[], compile=compile, prefill_graph=prefill_graph)
    ours_out: list[list[int]] = []

    def ours() -> None:
        ours_out[:] = generate(model, prompts, config)

    row: dict[str, Any] = {
        "spec": spec_name,
        "params": model.num_parameters(),
        "device": device,
        "dtype": dtype,
        "batch": batch,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "prefill_graph": prefill_graph,
        "attention_kernel": spec.attention_kernel.name,
    }
    t0 = time.perf_counter()
    ours()  # first call: compilation and graph capture
    sync(dev)
    row["first_call_s"] = round(time.perf_counter() - t0, 2)
    if skip_hf:
        t = _timed(ours, dev, repeats)
    else:
        hf = _hf_model(model)
        ids = torch.tensor(prompts, device=dev)
        kwargs: dict[str, Any] = dict(
            max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, eos_token_id=None
        )
        hf_out: list[torch.Tensor] = []

        def theirs(**extra: Any) -> None:
            with torch.inference_mode():
                hf_out[:] = [hf.generate(ids, attention_mask=torch.ones_like(ids), **kwargs, **extra)]

        t, t_hf = best_times_interleaved([ours, theirs], dev, repeats, clock=CLOCK)  # A B A B: drift hits both
        row["hf_tok_s"] = batch * new_tokens / t_hf
    row["llamaforge_tok_s"] = batch * new_tokens / t
    try:
        with torch.inference_mode():
            row.update(_step_profile(model, dev, new_tokens))
    except Exception as exc:  # a diagnostic must never cost the measurement
        row["step_profile_error"] = f"{type(exc).__name__}: {exc}"
    if "graph_step_ms" in row:  # what a call costs beyond its decode steps: prefill, first token, host work
        row["fixed_ms_per_call"] = round(1000 * t - (new_tokens - 1) * row["graph_step_ms"], 2)
    if skip_hf:
        print(json.dumps(row), flush=True)
        return row
    row["ratio"] = row["llamaforge_tok_s"] / row["hf_tok_s"]
    theirs_out = hf_out[0][:, prompt_len:].tolist()
    row["same_tokens"] = theirs_out == ours_out
    row["matching_prefix"] = min(_common_prefix(a, b) for a, b in zip(theirs_out, ours_out))
    if hf_static:
        hf.generation_config.cache_implementation = "static"
        hf.forward = torch.compile(hf.forward, mode="reduce-overhead", fullgraph=True)
        t = _timed(theirs, dev, repeats)
        row["hf_static_compiled_tok_s"] = batch * new_tokens / t
        row["ratio_vs_hf_static_compiled"] = row["llamaforge_tok_s"] / row["hf_static_compiled_tok_s"]
    return row


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def graph_window(model: Any, steps: int) -> tuple[Any, int, int] | None:
    """(a function replaying the model's last captured decode step `n` times from the prompt's end, n, its batch
    size), or None when no step was captured (not CUDA, or decoding ran without a graph). The replays rewrite cache
    rows beyond the prompt, which the next generate call lays out again."""
    from llamaforge.core import generation

    pool = generation._sessions.get(model)
    if not pool:
        return None
    session = next(reversed(pool.values()))
    if session.graph is None:
        return None
    n = min(steps, session.total - session.plen - 2)

    def window() -> None:
        session.pos.fill_(session.plen)
        for _ in range(n):
            session.replay()

    return window, n, session.bsz


def _step_profile(model: Any, dev: torch.device, steps: int) -> dict[str, Any]:
    """On CUDA: the captured decode step alone (graph replays timed with events), and the bandwidth it implies."""
    from llamaforge.core import generation

    if dev.type != "cuda" or not generation._sessions.get(model):
        return {}
    found = graph_window(model, steps)
    if found is None:
        return {"graph": False}
    window, n, bsz = found
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    window()
    end.record()
    end.synchronize()
    step_ms = start.elapsed_time(end) / n
    weights = streamed_weight_bytes(model)
    return {
        "graph": True,
        "graph_step_ms": round(step_ms, 4),
        "graph_tok_s": round(bsz * 1000 / step_ms, 1),
        "weight_bytes_per_step": weights,
        "weight_read_tb_s": round(weights / step_ms / 1e9, 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spec", nargs="+", default=["tiny", "100m"], help="tiny, 100m, or any preset / spec file")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch", type=int, nargs="+", default=[1])
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--hf-static", action="store_true", help="also time transformers with static cache + compile")
    ap.add_argument("--skip-hf", action="store_true", help="only llamaforge (e.g. large batches)")
    ap.add_argument("--compile", choices=["auto", "on", "off"], default="auto", help="llamaforge's decode step")
    ap.add_argument(
        "--prefill-graph",
        choices=["auto", "on", "off"],
        default="auto",
        help="GenerationConfig.prefill_graph (auto: where the decode step replays a CUDA graph)",
    )
    ap.add_argument("--attention-kernel", default=None, help="override the spec's, e.g. flash_decode")
    ap.add_argument("--clock", choices=["wall", "process"], default="wall", help="process: CPU time, 1 thread")
    ap.add_argument("--json", default=None, help="write the rows here too")
    args = ap.parse_args()
    if args.clock == "process":
        global CLOCK
        CLOCK = time.process_time
        torch.set_num_threads(1)
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    meta = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else platform.processor(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "clock": args.clock,
    }
    print(json.dumps(meta))
    rows = []
    for spec in args.spec:
        for batch in args.batch:
            row = bench(
                spec,
                device=args.device,
                dtype=args.dtype,
                batch=batch,
                prompt_len=args.prompt_len,
                new_tokens=args.new_tokens,
                repeats=args.repeats,
                hf_static=args.hf_static,
                skip_hf=args.skip_hf,
                compile={"auto": None, "on": True, "off": False}[args.compile],
                prefill_graph={"auto": None, "on": True, "off": False}[args.prefill_graph],
                attention_kernel=args.attention_kernel,
            )
            rows.append(row)
            line = f"{spec:>12} b={batch:<3} llamaforge {row['llamaforge_tok_s']:9.1f} tok/s"
            if row.get("graph"):
                line += f" (graph step {row['graph_step_ms']:.3f} ms, {row['weight_read_tb_s']:.2f} TB/s of weights,"
                line += f" {row['fixed_ms_per_call']:.1f} ms fixed per call)"
            if "hf_tok_s" in row:
                line += f" | transformers {row['hf_tok_s']:9.1f} tok/s | ratio {row['ratio']:.2f}x"
                line += f" | same tokens: {row['same_tokens']} (prefix {row['matching_prefix']})"
            if "hf_static_compiled_tok_s" in row:
                line += f" | hf static+compile {row['hf_static_compiled_tok_s']:.1f} tok/s"
            print(line, flush=True)
            print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
