"""Does prefetching a layer's weights into L2 during its one-query attention speed the products that follow?

    python benchmarks/prefetch_micro.py --json prefetch.json     # H200 (sm_90+): Llama-3.2-1B's o_proj and gate/up

A decode layer on the GPU runs attention (reads almost nothing, ~6 us), then o_proj and the stacked gate/up
products (bandwidth-bound). Each "program" below is a sequence of those kernels for one layer, captured in a CUDA
graph `--copies` times over distinct weight copies (more bytes than L2 holds, so nothing stays cached from one copy
to the next) and timed by replaying the graph. `pf` is llamaforge.kernels.l2_prefetch (bulk L2 prefetch of the
layer's o_proj and gate/up weights, or their first `--budget-mb` megabytes). If `pf+attn+o+gu` beats `attn+o+gu`,
the prefetch hides weight reading behind attention. The products run both as inductor's reduction (compiled with
coordinate-descent tuning, as the decode step is) and as llamaforge's row GEMV kernel.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from datetime import UTC, datetime
from typing import Any

import torch
import torch.nn.functional as F

from llamaforge.kernels import l2_prefetch, row_gemv


def _time_program(ops: list, copies: int, replays: int) -> float:
    """Microseconds per layer: `ops(i)` for i over the copies, captured in one CUDA graph, replayed."""

    def body() -> None:
        for i in range(copies):
            for op in ops:
                op(i)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        body()
        body()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body()
    graph.replay()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) * 1000 / (replays * copies))
    return round(best, 2)


def _run_dtype(args: argparse.Namespace, dtype: str, dim: int, ffn: int, x: torch.Tensor, attn, sleep) -> dict:
    dev = x.device
    if dtype == "int8":
        wo = [torch.randint(-127, 128, (dim, dim), device=dev, dtype=torch.int8) for _ in range(args.copies)]
        wgu = [torch.randint(-127, 128, (2 * ffn, dim), device=dev, dtype=torch.int8) for _ in range(args.copies)]
    else:
        wo = [torch.randn(dim, dim, device=dev, dtype=torch.bfloat16) / 50 for _ in range(args.copies)]
        wgu = [torch.randn(2 * ffn, dim, device=dev, dtype=torch.bfloat16) / 50 for _ in range(args.copies)]
    budget = int(args.budget_mb * (1 << 20))
    row_bytes = dim * wgu[0].element_size()
    o_bytes = wo[0].numel() * wo[0].element_size()
    gu_rows = min(wgu[0].size(0), max(0, budget - o_bytes) // row_bytes)  # after o_proj's weights
    gu_rows_alone = min(wgu[0].size(0), budget // row_bytes)

    def reduction(xr: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return (xr.float() * w.float()).sum(-1)

    compiled = torch.compile(reduction, options={"coordinate_descent_tuning": True}, dynamic=False)
    kernels = {"inductor": compiled, "row_gemv": lambda xr, w: row_gemv.launch(xr, [w])}

    def pf_all(i: int) -> None:
        l2_prefetch.launch([wo[i]] + ([wgu[i][:gu_rows]] if gu_rows else []))

    def pf_gu(i: int) -> None:
        l2_prefetch.launch([wgu[i][:gu_rows_alone]])

    results: dict[str, Any] = {}
    for kname, fn in kernels.items():

        def o(i: int, fn=fn) -> None:
            fn(x, wo[i])

        def gu(i: int, fn=fn) -> None:
            fn(x, wgu[i])

        programs = {
            "attn": [attn],
            "o": [o],
            "gu": [gu],
            "pf": [pf_all],
            "attn+o+gu": [attn, o, gu],
            "pf+attn+o+gu": [pf_all, attn, o, gu],
            "sleep+gu": [sleep, gu],
            "pf+sleep+gu": [pf_gu, sleep, gu],
            "sleep": [sleep],
            "pf+sleep": [pf_gu, sleep],
        }
        row: dict[str, Any] = {}
        for name, ops in programs.items():
            try:
                row[name] = _time_program(ops, args.copies, args.replays)
            except Exception as exc:  # report and go on: one failing program should not hide the others
                row[name] = f"{type(exc).__name__}: {str(exc)[:200]}"
            print(f"{dtype:5} {kname:9} {name:14} {row[name]}", flush=True)
        try:
            row["gu_warm_us"] = round(row["pf+sleep+gu"] - row["pf+sleep"], 2)
            row["gu_cold_us"] = round(row["sleep+gu"] - row["sleep"], 2)
            row["saved_us_per_layer"] = round(row["attn+o+gu"] - row["pf+attn+o+gu"], 2)
        except TypeError:
            pass
        row["prefetched_mb"] = round((o_bytes + gu_rows * row_bytes) / 2**20, 1)
        results[f"{dtype} {kname}"] = row
        print(json.dumps({f"{dtype} {kname}": row}), flush=True)
    return results


def run(args: argparse.Namespace) -> dict[str, Any]:
    dev = torch.device("cuda")
    torch.manual_seed(0)
    dim, ffn, heads, kv, hd, cache = 2048, 8192, 32, 8, 64, 384
    q = torch.randn(1, heads, 1, hd, device=dev, dtype=torch.bfloat16)
    kc = torch.randn(1, kv, cache, hd, device=dev, dtype=torch.bfloat16)
    vc = torch.randn(1, kv, cache, hd, device=dev, dtype=torch.bfloat16)
    mask = torch.zeros(1, 1, 1, cache, device=dev, dtype=torch.bool)
    mask[..., :300] = True
    x = torch.randn(1, dim, device=dev, dtype=torch.bfloat16)

    def attn(i: int) -> None:
        F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask, enable_gqa=True)

    def sleep(i: int) -> None:
        torch.cuda._sleep(args.sleep_cycles)

    results: dict[str, Any] = {}
    for dtype in args.dtypes:
        results.update(_run_dtype(args, dtype, dim, ffn, x, attn, sleep))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtypes", nargs="+", default=["int8", "bf16"], choices=["int8", "bf16"])
    parser.add_argument("--copies", type=int, default=8)
    parser.add_argument("--replays", type=int, default=20)
    parser.add_argument("--budget-mb", type=float, default=40.0, help="most bytes prefetched per layer")
    parser.add_argument("--sleep-cycles", type=int, default=40000, help="the idle kernel's length (~20 us)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() or not l2_prefetch.available(torch.device("cuda")):
        print("needs a CUDA GPU of compute capability 9.0+ with Triton", file=sys.stderr)
        return 2
    meta = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "torch": torch.__version__,
            "machine": torch.cuda.get_device_name(), "python": platform.python_version(),
            "copies": args.copies, "budget_mb": args.budget_mb}  # fmt: skip
    out = {"meta": meta, "results": run(args)}
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
