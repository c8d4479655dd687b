"""The fused batch-1 decode kernels alone (llamaforge.kernels.qkv_rope, gate_up, residual_gemv) over a sweep of
their launch settings, against the same arithmetic in PyTorch compiled by inductor with coordinate-descent tuning
(what the decode step runs when the kernels are off), at Llama-3.2-1B's shapes with the RMSNorm folded in; and the
flash-decoding attention kernel (llamaforge.kernels.decode_attention, bounded by the position in use) against
compiled SDPA over the whole static cache (cuDNN on an H200, what the decode step runs), per cache length and
position.

    python benchmarks/fused_micro.py --json fused_micro.json       # H200: bf16 and int8 weight-only
    python benchmarks/fused_micro.py --device cpu --calls 2        # CPU smoke run (the compiled references only;
                                                                   # TRITON_INTERPRET=1 adds the kernels)
    python benchmarks/fused_micro.py --kernels qkv_attn            # q/k/v + attention in one launch vs two

Why standalone: inside the decode step each kernel's time drifts with its neighbours and with how inductor's tuning
of the other kernels landed in that process (5-10% between runs), so launch settings cannot be compared there. Weights
are cycled over `--copies` copies (more bytes than the L2 cache holds) so every call reads them from HBM, and on CUDA
`--calls` calls are captured in one CUDA graph whose replays are timed (benchmarks/gemv_micro.py's timer). Every
setting's output is checked against the reference, so a fast wrong setting cannot win.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import platform
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import torch
from gemv_micro import _timer  # benchmarks/ is on sys.path when run as a script

# (q heads, kv heads, head size, width, FFN width, cache length): Llama-3.2-1B
SHAPE_1B = (32, 8, 64, 2048, 8192, 2048)
QKV_SWEEP = [f"{p}:{k}:{w}" for p, k, w in itertools.product((2, 4, 8), (512, 1024, 2048), (4, 8))] + [
    f"4:{k}:4:1" for k in (512, 1024, 2048)
]  # PAIRS:BLOCK_K:WARPS[:ONE_PASS]
GATE_UP_SWEEP = [f"{n}:{k}:{w}" for n, k, w in itertools.product((4, 8, 16), (512, 1024, 2048), (4, 8))]
RESIDUAL_SWEEP = [f"{n}:{k}:{w}" for n, k, w in itertools.product((2, 4, 8, 16), (512, 1024, 2048), (4, 8))]
ATTN_SWEEP = [f"{s}:{b}:{w}:1" for s, b, w in itertools.product((1, 2, 4, 8), (32, 64, 128), (4, 8))] + [
    f"{s}:{b}:4:0" for s, b in itertools.product((1, 4, 8), (32, 64))
]  # SPLITS:BLOCK:WARPS:DOT
ATTN_CASES = ["384:144", "384:272", "2048:1024"]  # CACHE_LENGTH:POSITIONS_IN_USE (the 1B benchmark's cache is 384)
QKV_ATTN_SWEEP = ["32:4", "64:4", "128:4", "256:4", "64:8", "128:8"]  # BLOCK_L:WARPS
QKV_ATTN_CASES = ["384:144", "384:272", "1024:900"]


def parse_setting(text: str, length: tuple[int, ...]) -> tuple[int, ...]:
    """`A:B:C[:D]` -> ints (powers of two for the first three; D, when allowed, 0 or 1)."""
    try:
        values = tuple(int(v) for v in text.split(":"))
    except ValueError:
        values = ()
    if len(values) not in length:
        raise ValueError(f"setting {text!r}: expected {' or '.join(str(n) for n in length)} integers joined by ':'")
    if any(v < 1 or v & (v - 1) for v in values[:3]):
        raise ValueError(f"setting {text!r}: the first three values must be powers of two")
    if len(values) == 4 and values[3] not in (0, 1):
        raise ValueError(f"setting {text!r}: the fourth value (one pass, or tensor cores) is 0 or 1")
    return values


def _parse_case(text: str) -> tuple[int, int]:
    """`LENGTH:USED` -> (cache length, positions in use), 1 <= USED <= LENGTH."""
    try:
        length, used = (int(v) for v in text.split(":"))
    except ValueError:
        raise ValueError(f"attention case {text!r}: expected CACHE_LENGTH:POSITIONS, e.g. 384:144") from None
    if not 1 <= used <= length:
        raise ValueError(f"attention case {text!r}: positions in use must be between 1 and the cache length")
    return length, used


def _operands(kernel: str, rows: list[int], k: int, int8: bool, args: argparse.Namespace, seed: int):
    """(generator, device, the row, an RMSNorm's (weight, eps), weight copies, the result row to fill): copies of
    (weights, scales or None), enough bytes to overflow the L2 cache."""
    from llamaforge.plugins.quantizers import quantize_int8_rows

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, k, generator=g).to(device, dtype)
    norm = ((torch.rand(k, generator=g) + 0.5).to(device, dtype), 1e-5)
    one = (1 if int8 else dtype.itemsize) * sum(rows) * k
    copies = []
    for _ in range(max(2, min(args.copies, (1 << 30) // one))):
        mats = [torch.randn(n, k, generator=g) / k**0.5 for n in rows]
        if int8:
            pairs = [quantize_int8_rows(m) for m in mats]
            copies.append(([q.to(device) for q, _ in pairs], tuple(s.to(device, dtype) for _, s in pairs)))
        else:
            copies.append(([m.to(device, dtype) for m in mats], None))
    out = {"kernel": kernel, "weights": "int8" if int8 else str(dtype).removeprefix("torch."), "weight_bytes": one,
           "us": {}}  # fmt: skip
    return g, device, x, norm, copies, out


def _rope_rows(g: torch.Generator, d: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin rows of one position for head size d in x's device and dtype (rotate-half's sign folded into sin, as
    RotaryEmbedding gives them)."""
    angle = torch.rand(d // 2, generator=g) * 6
    cos = torch.cat((angle.cos(), angle.cos())).to(x.device, x.dtype)
    sin = torch.cat((-angle.sin(), angle.sin())).to(x.device, x.dtype)
    return cos, sin


def _compiled(fn: Callable) -> Callable:
    """`fn` compiled as the decode step compiles (coordinate-descent tuning, static shapes), from a clean slate."""
    torch._dynamo.reset()
    return torch.compile(fn, options={"coordinate_descent_tuning": True}, dynamic=False)


def _kernels_here(device: torch.device) -> bool:
    """The Triton kernels run on CUDA, or on CPUs in Triton's interpreter (slowly: the smoke test)."""
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def _sweep(
    out: dict[str, Any], time_it: Callable, reference: Callable[[int], Any], contenders: dict[str, Callable[[int], Any]]
) -> None:
    """Times the compiled reference and each contender (checked against the reference's values first)."""
    want = reference(0)
    want = [t.float().clone() for t in (want if isinstance(want, tuple) else (want,))]
    out["us"]["inductor (compiled reference)"] = round(time_it(reference), 2)
    for label, fn in contenders.items():
        try:
            got = fn(0)
            got = got if isinstance(got, tuple) else (got,)
            err = max(float((a.float() - b).abs().max() / b.abs().max().clamp_min(1e-6)) for a, b in zip(got, want))
            if err > 2e-2:
                out["us"][label] = f"error: wrong values (relative error {err:.2e})"
                continue
            out["us"][label] = round(time_it(fn), 2)
        except Exception as exc:  # a setting Triton rejects must not end the sweep
            out["us"][label] = f"error: {type(exc).__name__}: {str(exc)[:160]}"
    timed = {label: us for label, us in out["us"].items() if isinstance(us, float)}
    out["tb_s"] = {label: round(out["weight_bytes"] / us / 1e6, 2) for label, us in timed.items()}
    kernels = {label: us for label, us in timed.items() if not label.startswith("inductor")}
    if kernels:
        best = min(kernels, key=kernels.get)
        out["best"] = best
        out["best_speedup_vs_inductor"] = round(timed["inductor (compiled reference)"] / kernels[best], 3)


def measure_qkv(int8: bool, args: argparse.Namespace, settings: list[tuple[int, ...]]) -> dict[str, Any]:
    from llamaforge.kernels import qkv_rope

    hq, hkv, d, k, _, length = args.shape
    g, device, x, norm, copies, out = _operands("qkv_rope", [hq * d, hkv * d, hkv * d], k, int8, args, seed=0)
    cos, sin = _rope_rows(g, d, x)
    kc, vc = (torch.zeros(1, hkv, length, d, device=device, dtype=x.dtype) for _ in range(2))
    pos = torch.tensor([length // 2], device=device)
    compiled = _compiled(qkv_rope.reference)

    def reference(i: int) -> torch.Tensor:
        ws, sc = copies[i % len(copies)]
        return compiled(x, *ws, cos, sin, kc, vc, pos, sc, norm)

    contenders = {}
    if _kernels_here(device):
        for pairs, block_k, warps, *rest in settings:
            one_pass = bool(rest and rest[0])

            def kernel(i: int, pairs=pairs, block_k=block_k, warps=warps, one_pass=one_pass) -> torch.Tensor:
                ws, sc = copies[i % len(copies)]
                return qkv_rope.launch(x, *ws, cos, sin, kc, vc, pos, sc, norm, pairs=pairs, block_k=block_k,
                                       warps=warps, one_pass=one_pass)  # fmt: skip

            contenders[f"qkv_rope {pairs}:{block_k}:{warps}" + (":1" if one_pass else "")] = kernel
    _sweep(out, _timer(device, args.calls, args.repeats), reference, contenders)
    return out


def measure_gate_up(int8: bool, args: argparse.Namespace, settings: list[tuple[int, ...]]) -> dict[str, Any]:
    from llamaforge.kernels import gate_up

    *_, k, n, _ = args.shape
    _, device, x, norm, copies, out = _operands("gate_up", [n, n], k, int8, args, seed=1)
    compiled = _compiled(gate_up.reference)

    def reference(i: int) -> torch.Tensor:
        ws, sc = copies[i % len(copies)]
        return compiled(x, *ws, sc, norm)

    contenders = {}
    if _kernels_here(device):
        for block_n, block_k, warps in settings:

            def kernel(i: int, block_n=block_n, block_k=block_k, warps=warps) -> torch.Tensor:
                ws, sc = copies[i % len(copies)]
                return gate_up.launch(x, *ws, sc, norm, block_n=block_n, block_k=block_k, warps=warps)

            contenders[f"gate_up {block_n}:{block_k}:{warps}"] = kernel
    _sweep(out, _timer(device, args.calls, args.repeats), reference, contenders)
    return out


def measure_residual(int8: bool, args: argparse.Namespace, settings: list[tuple[int, ...]]) -> list[dict[str, Any]]:
    """o_proj and down_proj with the residual addition after each (llamaforge.kernels.residual_gemv): a row each."""
    hq, _, d, _, n, _ = args.shape
    return [_measure_residual_product(name, width, int8, args, settings)
            for name, width in (("o_proj", hq * d), ("down_proj", n))]  # fmt: skip


def _measure_residual_product(
    name: str, width: int, int8: bool, args: argparse.Namespace, settings: list[tuple[int, ...]]
) -> dict[str, Any]:
    """`residual + x @ W.T` for one row of `width` values and W of the model's width in rows."""
    from llamaforge.kernels import residual_gemv

    k = args.shape[3]
    g, device, x, _, copies, out = _operands(f"residual {name}", [k], width, int8, args, seed=3)
    residual = torch.randn(1, k, generator=g).to(device, x.dtype)
    compiled = _compiled(residual_gemv.reference)

    def reference(i: int) -> torch.Tensor:
        (w,), sc = copies[i % len(copies)]
        return compiled(x, w, sc[0] if sc else None, residual)

    contenders = {}
    if _kernels_here(device):
        for block_n, block_k, warps in settings:

            def kernel(i: int, block_n=block_n, block_k=block_k, warps=warps) -> torch.Tensor:
                (w,), sc = copies[i % len(copies)]
                return residual_gemv.launch(x, w, sc[0] if sc else None, residual, block_n=block_n,
                                            block_k=block_k, warps=warps)  # fmt: skip

            contenders[f"residual_gemv {block_n}:{block_k}:{warps}"] = kernel
    _sweep(out, _timer(device, args.calls, args.repeats), reference, contenders)
    return out


def measure_attention(case: tuple[int, int], args: argparse.Namespace, settings: list[tuple[int, ...]]):
    """One layer's attention for one query at batch 1: `length` cache positions of which the first `used` are
    written and allowed. The reference is SDPA given the additive mask (the decode step converts the mask once per
    step, not per layer), compiled as the step compiles it; the kernel reads the boolean mask and the extent."""
    from torch.nn import functional as F

    from llamaforge.kernels import decode_attention as dec

    hq, hkv, d, *_ = args.shape
    length, used = case
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator().manual_seed(2)
    q = torch.randn(1, hq, 1, d, generator=g).to(device, dtype)
    one = 2 * hkv * length * d * dtype.itemsize  # one layer's keys and values
    copies = [tuple(torch.randn(1, hkv, length, d, generator=g).to(device, dtype) for _ in range(2))
              for _ in range(max(2, min(256, (128 << 20) // one)))]  # fmt: skip
    allowed = torch.arange(length, device=device)[None, :] < used  # (1, L)
    additive = torch.zeros(1, 1, 1, length, device=device, dtype=dtype).masked_fill(~allowed[:, None, None], -torch.inf)
    extent = torch.tensor([used], device=device)
    scale = 1 / d**0.5
    out = {"kernel": "decode_attention", "weights": f"cache {length}, {used} in use",
           "weight_bytes": one * used // length, "us": {}}  # fmt: skip

    def sdpa(q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)

    compiled = _compiled(sdpa)

    def reference(i: int) -> torch.Tensor:
        k, v = copies[i % len(copies)]
        return compiled(q, k, v, additive)

    contenders = {}
    if _kernels_here(device):
        for splits, block, warps, dot in [(0, 0, 0, 0), *settings]:  # (0, ...): the launch defaults

            def kernel(i: int, splits=splits, block=block, warps=warps, dot=dot) -> torch.Tensor:
                k, v = copies[i % len(copies)]
                return dec.launch(q, k, v, allowed, scale, extent, splits=splits or None, block=block or None,
                                  warps=warps or None, dot=bool(dot) if block else None)  # fmt: skip

            label = f"{splits}:{block}:{warps}:{dot}" if block else f"defaults {dec.launch_tag()}"
            contenders[f"decode_attention {label}"] = kernel
    _sweep(out, _timer(device, args.calls, args.repeats), reference, contenders)
    return out


def measure_qkv_attention(case: tuple[int, int], int8: bool, args: argparse.Namespace, settings: list[tuple[int, ...]]):
    """One layer's q/k/v products, RoPE, cache write and attention for one query (the RMSNorm folded in): the
    reference is what the decode step runs without the attention folded in, compiled as it compiles it (the
    qkv_rope kernel, then SDPA over the whole cache with the boolean mask: cuDNN on an H200); the contenders are
    the one-launch kernel (`qkv_rope_attention`) at BLOCK_L:WARPS settings."""
    from torch.nn import functional as F

    from llamaforge.kernels import qkv_rope

    hq, hkv, d, k, *_ = args.shape
    length, used = case
    g, device, x, norm, copies, out = _operands("qkv_rope_attention", [hq * d, hkv * d, hkv * d], k, int8, args, 3)
    out["kernel"] = f"qkv_rope_attention cache {length}, {used} in use"
    cos, sin = _rope_rows(g, d, x)
    kc, vc = (torch.randn(1, hkv, length, d, generator=g).to(device, x.dtype) for _ in range(2))
    pos = torch.tensor([used - 1], device=device)
    allowed = (torch.arange(length, device=device) < used).reshape(1, 1, 1, length)
    extent = torch.tensor([used], device=device)
    sync = torch.zeros(hkv, dtype=torch.int32, device=device)
    scale = 1 / d**0.5

    def unfused(x, wq, wk, wv, cos, sin, kc, vc, pos, allowed, sc, norm):
        q = qkv_rope.qkv_rope_cache(x, wq, wk, wv, cos, sin, kc, vc, pos, sc, norm).view(1, hq, 1, d)
        o = F.scaled_dot_product_attention(q, kc, vc, attn_mask=allowed, scale=scale, enable_gqa=True)
        return o.reshape(1, hq * d)

    compiled = _compiled(unfused)

    def reference(i: int) -> torch.Tensor:
        ws, sc = copies[i % len(copies)]
        return compiled(x, *ws, cos, sin, kc, vc, pos, allowed, sc, norm)

    contenders = {}
    if _kernels_here(device):
        for block_l, warps in settings:

            def kernel(i: int, block_l=block_l, warps=warps) -> torch.Tensor:
                ws, sc = copies[i % len(copies)]
                return qkv_rope.launch(x, *ws, cos, sin, kc, vc, pos, sc, norm, warps=warps,
                                       attend=(allowed, extent, sync, scale), block_l=block_l)  # fmt: skip

            contenders[f"qkv_rope_attention {block_l}:{warps}"] = kernel
    _sweep(out, _timer(device, args.calls, args.repeats), reference, contenders)
    if sync.any():
        raise RuntimeError("qkv_rope_attention left a counter set: the next launch would attend early")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument(
        "--shape",
        type=int,
        nargs=6,
        default=SHAPE_1B,
        metavar=("HQ", "HKV", "D", "K", "N", "LEN"),
        help="q heads, kv heads, head size, width, FFN width, cache length (default: Llama-3.2-1B)",
    )
    ap.add_argument("--qkv", nargs="*", default=QKV_SWEEP, help="qkv_rope settings PAIRS:BLOCK_K:WARPS[:ONE_PASS]")
    ap.add_argument("--gate-up", nargs="*", default=GATE_UP_SWEEP, help="gate_up settings BLOCK_N:BLOCK_K:WARPS")
    ap.add_argument("--residual", nargs="*", default=RESIDUAL_SWEEP,
                    help="residual_gemv settings BLOCK_N:BLOCK_K:WARPS")  # fmt: skip
    ap.add_argument("--attn", nargs="*", default=ATTN_SWEEP, help="decode_attention settings SPLITS:BLOCK:WARPS:DOT")
    ap.add_argument("--attn-cases", nargs="*", default=ATTN_CASES, help="attention cases CACHE_LENGTH:POSITIONS")
    ap.add_argument("--qkv-attn", nargs="*", default=QKV_ATTN_SWEEP,
                    help="qkv_rope_attention settings BLOCK_L:WARPS")  # fmt: skip
    ap.add_argument("--qkv-attn-cases", nargs="*", default=QKV_ATTN_CASES,
                    help="qkv_rope_attention cases CACHE_LENGTH:POSITIONS")  # fmt: skip
    ap.add_argument("--no-int8", action="store_true", help="bf16 weights only")
    ap.add_argument(
        "--kernels",
        nargs="+",
        choices=("qkv", "gate_up", "residual", "attn", "qkv_attn"),
        default=["qkv", "gate_up", "attn"],
        help="which kernels to time (default: the first three)",
    )
    ap.add_argument("--copies", type=int, default=8, help="weight copies cycled through (to read from HBM)")
    ap.add_argument("--calls", type=int, default=20, help="calls per timing (per CUDA graph on a GPU)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()  # fmt: skip
    try:
        qkv = [parse_setting(s, (3, 4)) for s in args.qkv]
        gu = [parse_setting(s, (3,)) for s in args.gate_up]
        res = [parse_setting(s, (3,)) for s in args.residual]
        attn = [parse_setting(s, (4,)) for s in args.attn]
        cases = [_parse_case(s) for s in args.attn_cases]
        qkv_attn = [parse_setting(s, (2,)) for s in args.qkv_attn]
        qkv_attn_cases = [_parse_case(s) for s in args.qkv_attn_cases]
    except ValueError as exc:
        ap.error(str(exc))
    hq, hkv, d, *_ = args.shape
    if min(args.shape) < 1 or d % 2 or hq % hkv:
        ap.error("--shape: positive sizes, an even head size and q heads a multiple of kv heads")
    if args.copies < 1 or args.calls < 1 or args.repeats < 1:
        ap.error("--copies, --calls and --repeats must be at least 1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA GPU here (use --device cpu for a smoke run)")
    results = []
    products = [(measure, settings) for name, measure, settings in (("qkv", measure_qkv, qkv),
                ("gate_up", measure_gate_up, gu), ("residual", measure_residual, res))
                if name in args.kernels]  # fmt: skip
    runs = [functools.partial(measure, int8, args, settings) for int8 in ((False,) if args.no_int8 else (False, True))
            for measure, settings in products]  # fmt: skip
    runs += [functools.partial(measure_attention, case, args, attn) for case in cases if "attn" in args.kernels]
    runs += [functools.partial(measure_qkv_attention, case, int8, args, qkv_attn) for case in qkv_attn_cases
             for int8 in ((False,) if args.no_int8 else (False, True)) if "qkv_attn" in args.kernels]  # fmt: skip
    for run in runs:
        got = run()
        for row in got if isinstance(got, list) else [got]:  # measure_residual: a row per product
            results.append(row)
            timed = sorted((us, label) for label, us in row["us"].items() if isinstance(us, float))
            top = ", ".join(f"{label} {us} us ({row['tb_s'][label]} TB/s)" for us, label in timed[:4])
            print(f"{row['kernel']} {row['weights']}: {top}", flush=True)
    meta = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "torch": torch.__version__,
            "machine": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.machine(),
            "shape": args.shape, "copies": args.copies, "calls": args.calls}  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": results}, f, indent=1)
    print(json.dumps({"meta": meta, "best": {f"{r['kernel']} {r['weights']}": [r.get("best"),
                      r.get("best_speedup_vs_inductor")] for r in results}}))  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
