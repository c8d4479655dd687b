"""A/B of the decode step's tuning switches, each variant in a fresh process, same machine, same run.

    python benchmarks/decode_variants.py --device cuda --spec llama3.2-1b --dtype bfloat16 \
        base buffer_row=0 inductor.triton.enable_pdl=1 attn=flash_decode "attn=flash_decode,splits=4" prefill_graph=1 \
        quant=int8_weight_only --profile --phases --json out.json
    python benchmarks/decode_variants.py --spec tiny --new-tokens 16 base greedy_step=0   # CPU smoke run

Run-to-run spread on fresh H200 machines is ~5% for the same code, so the step time of one variant is only
comparable with another measured in the same invocation; `--rounds 2` repeats the whole list (A B A B) to show the
drift. A variant whose step was compiled before (inductor's on-disk cache, `cache_hits` in its row) reuses the
kernels and their tuned launch settings; `--fresh-cache` compiles and tunes every variant from scratch (on an H200,
2026-12-02, the int8 step ran 0.850 ms compiled fresh and 0.952 ms from the cache in one invocation, its q/k/v
product 7.3 vs 10.8 us: whether the cache or the drift did that is what the flag tells).

Each variant is a comma-separated list of settings (`base` is none):

    switches of the decode step   buffer_row, siblings, pointwise_cat, greedy_step, argmax_blocks, kv_one_write (0/1),
                                  fold_norm, unstack_equal (0/1/auto: auto = on CPUs only, the default),
                                  gemv_rows (int: products with at most this many rows become reductions; 0: off)
    fused q/k/v + RoPE + cache    qkv_rope (0/1: batch-1 steps through llamaforge.kernels.qkv_rope), qkv_norm (0/1:
    write kernel                  the block's RMSNorm folded into it, on by default), qkv_pairs, qkv_block_k,
                                  qkv_warps (its launch settings), qkv_one_pass (0/1: the folded norm's statistics
                                  gathered in the products' loop), qkv_attn (0/1/auto: the step's attention in the
                                  same launch; auto = CUDA only), qkv_block_l (its loop step over the cache),
                                  attend_max (the longest static cache it takes)
    fused RMSNorm + gate/up +     gate_up (0/1/auto: one-row calls with plain weights through the gate_up kernel;
    SiLU kernel                   auto, the default: on CUDA), gate_up_int8 (0/1/auto: with int8 weight-only ones),
                                  gate_up_block_n, gate_up_block_k, gate_up_warps (overrides for every weight kind)
    o_proj / down_proj + residual residual, residual_int8 (0/1/auto: one-row calls with plain / int8 weight-only
                                  weights through llamaforge.kernels.residual_gemv; auto = CUDA only)
    eager int8 products           int8_mm (0/1/auto: eager int8 weight-only calls of a few rows on CUDA, the prefill's,
                                  through llamaforge.kernels.int8_mm; auto, the default: up to MAX_ROWS rows)
    the decoding loop             side_copy (0/1: the per-step read-back on a stream of its own, the default, or on
                                  the decode stream); compare e2e tok/s and fixed ms
    flash-decoding kernel         splits (int or auto), block, warps, fd_dot (tensor-core block products)
    row GEMV kernel               gemv_int8, gemv_float (0/1/auto: the graph pass hands all / none / the products
                                  measured faster on this GPU (the default) of int8 weight-only / plain weights
                                  to llamaforge.kernels.row_gemv), gemv_block_n,
                                  gemv_block_k, gemv_warps, gemv_split (split-K)
    model and call                attn (attention kernel plugin), quant (quantizer plugin), prefill_graph (0/1;
                                  unset: the default, on with CUDA graphs), gemv_route (per-product routing to the
                                  row GEMV kernel, see parse_route)
    any inductor option           inductor.NAME=VALUE, e.g. inductor.triton.enable_pdl=1 (Programmatic Dependent
                                  Launch); also laid over the decode step's own compile options

Per variant: end-to-end tokens/s of `llamaforge.generate` (best of --repeats, prefill included), the captured
decode step alone (CUDA graph replays timed with events), the fixed cost per call beyond the decode steps, with
--phases the wall time of generate() for 1, 2 and N new tokens, and with --profile the step's kernels (profiler over
10 uncaptured steps: time per step by kernel, top --top), which is where a change shows even when the step time
drifts between machines.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from _variants import VariantError, inductor_options, parse_settings  # benchmarks/ is on sys.path as a script

GEN = "llamaforge.core.generation"
KERNEL = "llamaforge.kernels.decode_attention"
GEMV = "llamaforge.kernels.row_gemv"
SWITCHES: dict[str, tuple[str, str, str]] = {  # setting -> (module, attribute, kind)
    "buffer_row": (GEN, "_BUFFER_ROW", "bool"),
    "fold_norm": (GEN, "_FOLD_NORM", "bool_or_auto"),
    "unstack_equal": (GEN, "_UNSTACK_EQUAL", "bool_or_auto"),
    "siblings": (GEN, "_FUSE_SIBLINGS", "bool"),
    "pointwise_cat": (GEN, "_POINTWISE_CAT", "bool"),
    "greedy_step": (GEN, "_FUSE_GREEDY_STEP", "bool"),
    "argmax_blocks": (GEN, "_ARGMAX_BLOCKS", "bool"),
    "gemv_rows": (GEN, "_GEMV_MAX_ROWS", "int"),
    "splits": (KERNEL, "_SPLITS", "int_or_auto"),
    "block": (KERNEL, "_BLOCK", "int"),
    "warps": (KERNEL, "_WARPS", "int"),
    "fd_dot": (KERNEL, "_DOT", "bool"),
    "gemv_int8": (GEMV, "INT8", "bool_or_auto"),
    "gemv_float": (GEMV, "FLOAT", "bool_or_auto"),
    "gemv_block_n": (GEMV, "_BLOCK_N", "int"),
    "gemv_block_k": (GEMV, "_BLOCK_K", "int"),
    "gemv_warps": (GEMV, "_WARPS", "int"),
    "gemv_split": (GEMV, "_SPLIT_K", "int"),
    "kv_one_write": ("llamaforge.core.cache", "_ONE_WRITE", "bool"),
    "qkv_rope": ("llamaforge.plugins.attention", "_FUSED_QKV_ROPE", "bool"),
    "qkv_norm": ("llamaforge.plugins.attention", "_FOLD_NORM", "bool"),
    "gate_up": ("llamaforge.core.model", "_FUSED_GATE_UP", "bool_or_auto"),
    "gate_up_int8": ("llamaforge.core.model", "_FUSED_GATE_UP_INT8", "bool_or_auto"),
    "gate_up_block_n": ("llamaforge.kernels.gate_up", "_BLOCK_N", "int"),
    "gate_up_block_k": ("llamaforge.kernels.gate_up", "_BLOCK_K", "int"),
    "gate_up_warps": ("llamaforge.kernels.gate_up", "_WARPS", "int"),
    "residual": ("llamaforge.kernels.residual_gemv", "PLAIN", "bool_or_auto"),
    "residual_int8": ("llamaforge.kernels.residual_gemv", "INT8", "bool_or_auto"),
    "qkv_pairs": ("llamaforge.kernels.qkv_rope", "_PAIRS", "int"),
    "qkv_block_k": ("llamaforge.kernels.qkv_rope", "_BLOCK_K", "int"),
    "qkv_warps": ("llamaforge.kernels.qkv_rope", "_WARPS", "int"),
    "qkv_one_pass": ("llamaforge.kernels.qkv_rope", "_ONE_PASS", "bool"),
    "qkv_attn": ("llamaforge.plugins.attention", "_FUSED_ATTENTION", "bool_or_auto"),
    "qkv_block_l": ("llamaforge.kernels.qkv_rope", "_BLOCK_L", "int"),
    "attend_max": ("llamaforge.plugins.attention", "_ATTEND_MAX_LENGTH", "int"),
    "side_copy": (GEN, "_SIDE_COPY", "bool"),
    "int8_mm": ("llamaforge.kernels.int8_mm", "ENABLED", "bool_or_auto"),
}
# Read inside the fused kernels' Triton ops when torch.compile traces them, which inductor's on-disk cache does not
# key on: a variant setting one of these replayed the default kernel from the cache (2026-12-02 run20, five "launch
# setting" variants with one kernel time). The decode pass's uuid now carries them, but a variant without the pass
# (gemv_rows=0) has no such key, so these variants always compile into an empty cache
FUSED_KERNELS = (
    "llamaforge.kernels.qkv_rope",
    "llamaforge.kernels.gate_up",
    "llamaforge.kernels.residual_gemv",
    KERNEL,
)
UNCACHED = {name for name, (module, _, _) in SWITCHES.items() if module in FUSED_KERNELS}
CALL_SETTINGS = {"attn": "str", "quant": "str", "prefill_graph": "bool", "gemv_route": "str"}


def parse_route(text: str) -> dict[tuple[int, int, int], tuple[int, int, int, int]]:
    """`gemv_route`: products handed to the row GEMV kernel on this GPU, as `_MEASURED` entries written
    BYTES/ROWS/K/BLOCK_N/BLOCK_K/WARPS/SPLIT_K joined by `+`, e.g. `1/2048/8192/4/1024/4/4+1/3072/2048/4/1024/4/1`
    (int8 down_proj with split-K 4, int8 q/k/v): an A/B of a routing table without editing the code."""
    table = {}
    for entry in text.split("+"):
        try:
            values = [int(v) for v in entry.split("/")]
        except ValueError:
            values = []
        if len(values) != 7 or min(values) < 1 or values[0] not in (1, 2, 4):
            raise VariantError(f"gemv_route entry {entry!r}: expected BYTES/ROWS/K/BLOCK_N/BLOCK_K/WARPS/SPLIT_K "
                               "with positive integers and 1, 2 or 4 bytes per weight")  # fmt: skip
        table[tuple(values[:3])] = tuple(values[3:])
    return table


def parse_variant(text: str) -> dict[str, Any]:
    """`buffer_row=0,attn=flash_decode` -> settings (`base`: none); checked before any process is started."""
    if text.strip() in ("", "base"):
        return {}
    settings = parse_settings(text, {**{k: kind for k, (_, _, kind) in SWITCHES.items()}, **CALL_SETTINGS})
    if "gemv_route" in settings:
        parse_route(settings["gemv_route"])
    return settings


# ----- in the child process -------------------------------------------------------------------------------------
def _apply(settings: dict[str, Any]) -> None:
    import importlib

    from torch._inductor import config as inductor_config

    for key, value in settings.items():
        if key in SWITCHES:
            module, attr, _ = SWITCHES[key]
            mod = importlib.import_module(module)
            if not hasattr(mod, attr):
                raise VariantError(f"{module}.{attr} does not exist in this checkout")
            setattr(mod, attr, value)
    if "gemv_route" in settings:
        import torch

        from llamaforge.kernels import row_gemv

        if torch.cuda.is_available():  # the table is per GPU architecture; on a CPU it routes nothing
            row_gemv._MEASURED = {torch.cuda.get_device_capability(): parse_route(settings["gemv_route"])}
    extra = inductor_options(settings)
    for name, value in extra.items():
        setattr(inductor_config, name, value)  # for every compile in the process (the prefill's kernels too)
    generation = importlib.import_module(GEN)
    generation._EXTRA_OPTIONS.update(extra)  # and over the decode step's own options, which would otherwise win


def _kernel_table(session: Any, steps: int, top: int) -> dict[str, Any]:
    """The decode step's kernels over `steps` uncaptured steps from the prompt's end; the session's state is put
    back afterwards."""
    from _timing import kernel_table

    saved = (session.ids.clone(), session.cur.clone(), session.pos.clone())
    session.pos.fill_(session.plen)
    try:
        return kernel_table(session._body, session.device, steps, top)
    finally:
        session._restore(saved)


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()  # a compile error's cause is at its end: keep both ends
        self.messages.append(text if len(text) <= 3000 else f"{text[:500]} [...] {text[-2500:]}")


def child(args: argparse.Namespace, settings: dict[str, Any]) -> dict[str, Any]:
    import torch
    from _timing import best_time, sync
    from generate_throughput import SPECS, _step_profile

    import llamaforge
    from llamaforge.core import generation
    from llamaforge.core.generation import GenerationConfig, generate
    from llamaforge.core.loading import apply_transform

    _apply(settings)
    spec = llamaforge.load_spec(SPECS.get(args.spec, args.spec))  # generate_throughput's names (100m) work too
    room = max(spec.max_positions, args.prompt_len + args.new_tokens)
    spec = spec.with_updates(eos_token_id=None, max_positions=room)
    if "attn" in settings:
        spec = spec.with_updates(attention_kernel=settings["attn"])
    dev = torch.device(args.device)
    model = llamaforge.build_model(spec, device=dev, dtype=args.dtype, seed=0).eval()
    if "quant" in settings:
        model = apply_transform(model, "quantizer", settings["quant"])
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, spec.vocab_size, (args.batch, args.prompt_len), generator=g).tolist()
    compile = {"auto": None, "on": True, "off": False}[args.compile]

    def config(n: int) -> GenerationConfig:
        return GenerationConfig(
            max_new_tokens=n, eos_token_ids=[], compile=compile, prefill_graph=settings.get("prefill_graph")
        )

    out: list[list[int]] = []
    row: dict[str, Any] = {"settings": settings}
    # generation's warnings (no compile, no CUDA graph) and dynamo's (a recompile limit reached runs the frame
    # eagerly, silently as far as generation can tell): the reasons a variant ran eagerly
    fallbacks = _Collect()
    for name in ("llamaforge", "torch._dynamo"):
        logging.getLogger(name).addHandler(fallbacks)
    t0 = time.perf_counter()
    out[:] = generate(model, prompts, config(args.new_tokens))
    sync(dev)
    row["first_call_s"] = round(time.perf_counter() - t0, 2)
    t = best_time(lambda: generate(model, prompts, config(args.new_tokens)), dev, args.repeats)
    row["e2e_tok_s"] = round(args.batch * args.new_tokens / t, 1)
    row["tokens_digest"] = hash(tuple(map(tuple, out))) & 0xFFFFFFFF  # equal across variants that decode alike
    with torch.inference_mode():
        row.update(_step_profile(model, dev, args.new_tokens))
    if "graph_step_ms" in row:
        row["fixed_ms_per_call"] = round(1000 * t - (args.new_tokens - 1) * row["graph_step_ms"], 2)
    if args.phases:
        for n in sorted({1, 2, args.new_tokens}):
            seconds = best_time(lambda n=n: generate(model, prompts, config(n)), dev, 3)  # its warm-up: a new session
            row[f"ms_generate_{n}"] = round(1000 * seconds, 2)
    if args.call_profile:
        from _timing import kernel_table

        # whole generate() calls under the profiler: GPU time against the call's span and the gaps between kernels
        # (with their neighbours), i.e. where the fixed cost and the loop's per-token cost go
        for n in sorted({1, args.call_profile}):
            t0 = time.perf_counter()
            table = kernel_table(lambda n=n: generate(model, prompts, config(n)), dev, 3, top=12)
            table["profiled_ms_per_call"] = round(1000 * (time.perf_counter() - t0) / 4, 2)  # incl. its warm-up call
            table.pop("ops", None)
            row[f"call_profile_{n}"] = table
    if args.profile:
        pool = generation._sessions.get(model)
        if pool:
            session = next(reversed(pool.values()))
            with torch.inference_mode():
                row.update(_kernel_table(session, 10, args.top))
        else:
            row["profile"] = "no decode session (eager decoding keeps none)"
    from torch._dynamo.utils import counters

    row["rewrites"] = generation._gemv_rewrites[0]  # 0 also when the graph came from inductor's on-disk cache
    row["cache_hits"] = counters["inductor"]["fxgraph_cache_hit"] + counters["aot_autograd"]["autograd_cache_hit"]
    if dev.type == "cuda" and generation._GEMV_MAX_ROWS and compile is not False:
        if not row["rewrites"] and not row["cache_hits"]:  # a pass matching nothing went unnoticed for sessions
            row["warning"] = "the decode GEMV graph pass rewrote no product: its switches had no effect here"
    if fallbacks.messages:
        row["fallbacks"] = fallbacks.messages[:5]
        row.setdefault("warning", fallbacks.messages[0][:200] + " [...] " + fallbacks.messages[0][-300:])
    options = generation._compile_options(dev)
    row["step_compile_options"] = {k: v for k, v in options.items() if isinstance(v, bool | int | float | str)}
    return row


# ----- in the parent --------------------------------------------------------------------------------------------
def run_variant(args: argparse.Namespace, text: str) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", text, *args.passthrough]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="inductor-") as fresh:
        env = dict(os.environ)
        # compiled and tuned from scratch: nothing from an earlier process
        if args.fresh_cache or parse_variant(text).keys() & UNCACHED:
            env["TORCHINDUCTOR_CACHE_DIR"] = fresh
            env["TRITON_CACHE_DIR"] = os.path.join(fresh, "triton")
        code_dir = getattr(args, "output_code", None)
        if code_dir:  # inductor's generated kernels, to read a step's configs offline
            env["TORCH_LOGS"] = "output_code"
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
        except subprocess.TimeoutExpired:
            return {"variant": text, "error": f"timed out after {args.timeout} s"}
    if code_dir:
        Path(code_dir).mkdir(parents=True, exist_ok=True)
        name = "".join(c if c.isalnum() or c in "=._-" else "_" for c in text)
        (Path(code_dir) / f"{name}.log").write_text(done.stderr)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-6:]
        return {"variant": text, "error": f"exit {done.returncode}: " + " | ".join(tail)}
    row = json.loads(lines[-1])
    row["variant"] = text
    row["process_s"] = round(time.perf_counter() - t0, 1)
    return row


def summary(rows: list[dict[str, Any]]) -> str:
    base = next((r for r in rows if "error" not in r), None)
    lines = [f"{'variant':<42} {'e2e tok/s':>9} {'step ms':>8} {'fixed ms':>8} {'kernels us':>10} {'vs first':>8}"]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['variant']:<42} ERROR {r['error'][:200]}")
            continue
        step = r.get("graph_step_ms")
        rel = f"{base['graph_step_ms'] / step:.3f}x" if step and base and base.get("graph_step_ms") else ""
        lines.append(
            f"{r['variant'][:42]:<42} {r['e2e_tok_s']:>9.1f} {step if step else '-':>8} "
            f"{r.get('fixed_ms_per_call', '-'):>8} {r.get('kernel_us_per_step', '-'):>10} {rel:>8}"
        )
        if "warning" in r:
            lines.append(f"  warning: {r['warning']}")
    repeated = {}  # a variant timed in several processes (--rounds, or named twice): its spread is the noise floor
    for r in rows:
        if "error" not in r and r.get("graph_step_ms"):
            repeated.setdefault(r["variant"], []).append(r)
    repeated = {v: rs for v, rs in repeated.items() if len(rs) > 1}
    if repeated:
        lines.append(f"{'variant (repeated)':<42} {'n':>2} {'e2e mean':>9} {'e2e min-max':>15} {'step mean':>9}")
    for variant, rs in repeated.items():
        e2e = [r["e2e_tok_s"] for r in rs]
        step = sum(r["graph_step_ms"] for r in rs) / len(rs)
        spread = f"{min(e2e):.0f}-{max(e2e):.0f}"
        lines.append(f"{variant[:42]:<42} {len(rs):>2} {sum(e2e) / len(e2e):>9.1f} {spread:>15} {step:>9.4f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("variants", nargs="*", default=["base"], help="settings per variant (see above)")
    ap.add_argument("--spec", default="tiny", help="preset, spec file, or generate_throughput's 100m")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--compile", choices=["auto", "on", "off"], default="auto")
    ap.add_argument("--profile", action="store_true", help="kernel table of the step")
    ap.add_argument("--top", type=int, default=25, help="kernels listed per variant")
    ap.add_argument("--phases", action="store_true", help="generate() wall time for 1, 2 and N new tokens")
    ap.add_argument("--call-profile", type=int, default=0, metavar="N",
                    help="profile generate() calls of 1 and N new tokens: kernels, idle gaps")  # fmt: skip
    ap.add_argument("--rounds", type=int, default=1, help="repeat the whole list (drift check)")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per variant")
    ap.add_argument("--fresh-cache", action="store_true",
                    help="an empty inductor/Triton cache per variant (no kernel or tuned launch setting reused from "
                         "an earlier process; compiles take longer)")  # fmt: skip
    ap.add_argument(
        "--output-code",
        default=None,
        metavar="DIR",
        help="write each variant's inductor-generated code (TORCH_LOGS=output_code) to DIR/VARIANT.log",
    )
    ap.add_argument("--json", default=None, help="write all rows here")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    try:
        parsed = {v: parse_variant(v) for v in ([args.child] if args.child is not None else args.variants)}
        for settings in parsed.values():
            inductor_options(settings)  # an option this torch lacks fails here, before any process starts
    except VariantError as exc:
        ap.error(str(exc))
    if args.child is not None:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        print(json.dumps(child(args, parsed[args.child])), flush=True)
        return
    skip = {"--json", "--rounds", "--timeout", "--fresh-cache", "--output-code"}
    args.passthrough = []
    for key, value in vars(args).items():
        flag = "--" + key.replace("_", "-")
        if key in ("variants", "child", "passthrough") or flag in skip or value is None or value is False:
            continue
        args.passthrough += [flag] if value is True else [flag, str(value)]
    import torch

    meta = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else platform.processor(),
        "torch": torch.__version__,
        "spec": args.spec,
        "dtype": args.dtype,
        "batch": args.batch,
        "new_tokens": args.new_tokens,
    }
    print(json.dumps(meta), flush=True)
    rows = []
    for round_ in range(args.rounds):
        for text in args.variants:
            row = run_variant(args, text)
            row["round"] = round_
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(summary(rows), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
