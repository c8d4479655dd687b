"""The one-row products of batch-1 decoding, one product at a time: cuBLAS, inductor's reduction (the decode graph
pass's form, compiled with coordinate-descent tuning as the decode step is) and llamaforge's row GEMV Triton kernel
over a sweep of its launch settings, in bf16 and int8 weight-only.

    python benchmarks/gemv_micro.py --json gemv.json                      # H200: Llama-3.2-1B's products
    python benchmarks/gemv_micro.py --int8 --sweep 8:1024:8 16:2048:8     # int8 too; chosen launch settings
    python benchmarks/gemv_micro.py --device cpu --shapes 96:64 --calls 4  # CPU smoke run (no Triton contender)

Why standalone: inside the decode step a product's time drifts with its neighbours and with the machine (5-10%
between fresh H200s), while one product timed alone shows which kernel streams weights fastest. Weights are cycled
over `--copies` copies (more bytes than the L2 cache holds), so every call reads them from HBM as the step does;
on CUDA `--calls` calls are captured in one CUDA graph and its replays are timed with events, so launch gaps do not
count. Per product: microseconds per call and weight TB/s for each contender, and the best row GEMV setting.

A shape is `N:K` (one matrix) or `N1+N2+N3:K` (matrices sharing the row, stacked in one call: q/k/v, gate/up).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import torch
from _timing import best_time  # benchmarks/ is on sys.path when run as a script

LLAMA_1B = ["2048+512+512:2048", "8192+8192:2048", "2048:8192", "2048:2048", "128256:2048"]
# the last four split each row's length over 2-8 programs (split-K)
SWEEP = ["8:1024:8", "4:1024:4", "16:1024:8", "8:2048:8", "16:2048:8", "32:512:8", "4:2048:4", "8:512:4",
         "4:1024:4:2", "4:1024:4:4", "2:2048:4:2", "8:512:4:8"]  # fmt: skip


def parse_shape(text: str) -> tuple[list[int], int]:
    rows, sep, k = text.partition(":")
    try:
        parts = [int(r) for r in rows.split("+")]
        width = int(k)
    except ValueError:
        raise ValueError(f"shape {text!r}: expected N:K or N1+N2:K with integers") from None
    if not sep or not parts or len(parts) > 3 or min(parts) < 1 or width < 2:
        raise ValueError(f"shape {text!r}: expected one to three row counts >= 1 and K >= 2, as N1+N2:K")
    return parts, width


def parse_setting(text: str) -> tuple[int, int, int, int]:
    """`BLOCK_N:BLOCK_K:WARPS[:SPLIT_K]` -> the four (split-K 1 when left out)."""
    try:
        values = [int(v) for v in text.split(":")]
    except ValueError:
        values = []
    if len(values) not in (3, 4):
        raise ValueError(f"setting {text!r}: expected BLOCK_N:BLOCK_K:WARPS or BLOCK_N:BLOCK_K:WARPS:SPLIT_K")
    bn, bk, warps, split = (*values, 1)[:4]
    for name, v in (("BLOCK_N", bn), ("BLOCK_K", bk), ("WARPS", warps)):
        if v < 1 or v & (v - 1):
            raise ValueError(f"setting {text!r}: {name} must be a power of two")
    if split < 1:
        raise ValueError(f"setting {text!r}: SPLIT_K must be at least 1")
    return bn, bk, warps, split


def _timer(device: torch.device, calls: int, repeats: int) -> Callable[[Callable[[int], Any]], float]:
    """Microseconds per call of `fn(i)` (i picks the weight copy), best of `repeats`."""

    def cpu(fn: Callable[[int], Any]) -> float:
        return best_time(lambda: [fn(i) for i in range(calls)], device, repeats) / calls * 1e6

    def cuda(fn: Callable[[int], Any]) -> float:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up (compilation, autotuning) outside the capture
            for i in range(2):
                fn(i)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for i in range(calls):
                fn(i)
        graph.replay()
        torch.cuda.synchronize()
        best = float("inf")
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            torch.cuda.synchronize()
            best = min(best, start.elapsed_time(end) * 1e3 / calls)
        return best

    return cuda if device.type == "cuda" else cpu


def measure_shape(
    rows: list[int], k: int, int8: bool, args: argparse.Namespace, settings: list[tuple[int, int, int, int]]
) -> dict[str, Any]:
    from torch.nn import functional as F

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(1, k, generator=g).to(device, dtype)
    one = sum(rows) * k * (1 if int8 else dtype.itemsize)
    copies = []  # enough to overflow the L2 cache; a large matrix (the output head) needs few
    for _ in range(max(2, min(args.copies, (1 << 30) // one))):
        mats = [torch.randn(n, k, generator=g) for n in rows]
        if int8:
            from llamaforge.plugins.quantizers import quantize_int8_rows

            pairs = [quantize_int8_rows(m) for m in mats]
            copies.append(([q.to(device) for q, _ in pairs], torch.cat([s for _, s in pairs]).to(device, dtype)))
        else:
            copies.append(([m.to(device, dtype) for m in mats], None))
    nbytes = sum(w.numel() * w.element_size() for w in copies[0][0])
    assert nbytes == one
    time_it = _timer(device, args.calls, args.repeats)
    out: dict[str, Any] = {"rows": rows, "k": k, "weights": "int8" if int8 else str(dtype).removeprefix("torch."),
                           "weight_bytes": nbytes, "us": {}}  # fmt: skip

    def record(label: str, fn: Callable[[int], Any]) -> None:
        try:
            us = time_it(fn)
        except Exception as exc:  # one contender failing (a setting Triton rejects) must not end the sweep
            out["us"][label] = f"error: {type(exc).__name__}: {str(exc)[:160]}"
            return
        out["us"][label] = round(us, 2)

    stacked = [torch.cat(ws) for ws, _ in copies]  # the decode pass stacks siblings (read in place there)
    if not int8:
        label = "F.linear per matrix" + (" (cuBLAS)" if device.type == "cuda" else "")
        record(label, lambda i: [F.linear(x, w) for w in copies[i % len(copies)][0]])

    def reduction(xr: torch.Tensor, w: torch.Tensor, s: torch.Tensor | None) -> torch.Tensor:
        y = (xr.float()[:, None, :] * w.float()).sum(-1)  # the decode pass's form
        return (y * s if s is not None else y).to(xr.dtype)

    torch._dynamo.reset()  # one compile per product: a shared cache would reach dynamo's recompile limit and fall
    # back to eager, which materialises the whole product (the output head then "took" 1.7 ms)
    compiled = torch.compile(reduction, options={"coordinate_descent_tuning": True}, dynamic=False)
    record("inductor reduction", lambda i: compiled(x, stacked[i % len(stacked)], copies[i % len(copies)][1]))
    if device.type == "cuda":
        from llamaforge.kernels import row_gemv

        for bn, bk, warps, split in settings:

            def kernel(i: int, bn=bn, bk=bk, warps=warps, split=split) -> torch.Tensor:
                ws = copies[i % len(copies)][0]
                return row_gemv.launch(x, ws, block_n=bn, block_k=bk, warps=warps, split=split)

            label = f"row_gemv {bn}:{bk}:{warps}" + (f":{split}" if split > 1 else "")
            record(label, kernel)
            want = row_gemv.reference(x, copies[0][0])  # and its values, so a fast wrong setting cannot win
            err = float((kernel(0) - want).abs().max() / want.abs().max().clamp_min(1e-6))
            out.setdefault("row_gemv_rel_err", {})[label] = err
            if err > 1e-3:
                out["us"][label] = f"error: wrong values (relative error {err:.2e})"
    timed = {label: us for label, us in out["us"].items() if isinstance(us, float)}
    out["tb_s"] = {label: round(nbytes / us / 1e6, 2) for label, us in timed.items()}
    gemv = {label: us for label, us in timed.items() if label.startswith("row_gemv")}
    if gemv:
        best = min(gemv, key=gemv.get)
        out["best_row_gemv"] = best
        # the entry for llamaforge.kernels.row_gemv._SETTINGS: (bytes per weight value, rows, K) -> setting
        out["settings_entry"] = [[1 if int8 else dtype.itemsize, sum(rows), k],
                                 [int(v) for v in best.split()[-1].split(":")]]  # fmt: skip
        if isinstance(out["us"].get("inductor reduction"), float):
            out["row_gemv_speedup_vs_inductor"] = round(out["us"]["inductor reduction"] / gemv[best], 3)
    return out


def route_text(results: list[dict[str, Any]]) -> str:
    """Each timed product's fastest row GEMV setting as decode_variants' `gemv_route` value
    (BYTES/ROWS/K/BLOCK_N/BLOCK_K/WARPS/SPLIT_K joined by `+`), so the next run can time the decode step with
    exactly those products on the kernel (`gpu_runs.sh route` does both in one call)."""
    entries = []
    for row in results:
        if "settings_entry" in row:
            (nbytes, rows, k), (bn, bk, warps, *split) = row["settings_entry"]
            entries.append(f"{nbytes}/{rows}/{k}/{bn}/{bk}/{warps}/{split[0] if split else 1}")
    return "+".join(entries)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shapes", nargs="+", default=LLAMA_1B, help="N:K or N1+N2(+N3):K (default: Llama-3.2-1B's)")
    ap.add_argument("--sweep", nargs="+", default=SWEEP, help="row GEMV settings BLOCK_N:BLOCK_K:WARPS[:SPLIT_K]")
    ap.add_argument("--int8", action="store_true", help="also time int8 weight-only products")
    ap.add_argument("--int8-only", action="store_true", help="time int8 weight-only products only")
    ap.add_argument("--copies", type=int, default=8, help="weight copies cycled through (to read from HBM)")
    ap.add_argument("--calls", type=int, default=20, help="calls per timing (per CUDA graph on a GPU)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    try:
        shapes = [parse_shape(s) for s in args.shapes]
        settings = [parse_setting(s) for s in args.sweep]
    except ValueError as exc:
        ap.error(str(exc))
    if args.copies < 1 or args.calls < 1 or args.repeats < 1:
        ap.error("--copies, --calls and --repeats must be at least 1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA GPU here (use --device cpu for a smoke run)")
    results = []
    for rows, k in shapes:
        for int8 in (True,) if args.int8_only else (False, True) if args.int8 else (False,):
            row = measure_shape(rows, k, int8, args, settings)
            results.append(row)
            timed = sorted((us, label) for label, us in row["us"].items() if isinstance(us, float))
            best = ", ".join(f"{label} {us} us ({row['tb_s'][label]} TB/s)" for us, label in timed[:3])
            print(f"{'+'.join(map(str, rows))}x{k} {row['weights']}: {best}", flush=True)
    meta = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "torch": torch.__version__,
            "machine": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.machine(),
            "copies": args.copies, "calls": args.calls}  # fmt: skip
    route = route_text(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": results, "gemv_route": route}, f, indent=1)
    print(json.dumps({"meta": meta, "best_row_gemv": {f"{r['weights']} {r['rows']}x{r['k']}": r.get("best_row_gemv")
                                                       for r in results}}))  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
