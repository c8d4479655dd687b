"""Eager int8 weight-only products of a few rows (a prefill, eager decoding): llamaforge's int8_mm Triton kernel
over launch settings against the PyTorch form (`F.linear(x, w.to(bf16)) * scale`) and a plain bf16 `F.linear`.

    python benchmarks/int8_mm_micro.py --json int8_mm.json         # H200: Llama-3.2-1B's products, 1/16/64 rows

Weights are cycled over `--copies` copies (more bytes than L2 holds) and the calls over them are captured in one CUDA
graph (gemv_micro's timer, best of `--repeats` replays), so every call reads its weights from HBM and launch gaps do
not count. Microseconds per call, and the weight
bytes of the int8 matrix over that time (TB/s).
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
from gemv_micro import _timer  # benchmarks/ is on sys.path when run as a script

from llamaforge.kernels import int8_mm

SHAPES = [(512, 2048), (2048, 2048), (16384, 2048), (2048, 8192), (128256, 2048)]  # k or v, q or o, gate/up, down, head
# BLOCK_M:BLOCK_N:BLOCK_K:warps:stages ("default": int8_mm.settings_for's choice)
SETTINGS = ["default", "16:64:256:4:3", "16:32:128:4:4", "16:16:128:4:4", "16:16:256:4:3", "16:32:256:4:3",
            "64:64:64:4:4"]  # fmt: skip


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    dev = torch.device("cuda")
    rows_out = []
    for n, k in SHAPES:
        copies = max(2, min(args.copies, (1 << 30) // (n * k)))  # >= ~1 GB of int8 weights per graph, at least 2
        timer = _timer(dev, copies, args.repeats)
        ws = [torch.randint(-127, 128, (n, k), device=dev, dtype=torch.int8) for _ in range(copies)]
        ss = [(torch.rand(n, device=dev) / 500 + 1e-4).to(torch.bfloat16) for _ in range(copies)]
        wb = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) for _ in range(copies)]
        for m in args.rows:
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            want = int8_mm.reference(x, ws[0], ss[0])
            us: dict[str, Any] = {
                "pytorch form": round(timer(lambda i, x=x, ws=ws, ss=ss: int8_mm.reference(x, ws[i], ss[i])), 2),
                "bf16 F.linear": round(timer(lambda i, x=x, wb=wb: F.linear(x, wb[i])), 2),
            }
            for setting in SETTINGS:
                launch = {}
                if setting != "default":  # int8_mm.settings_for's choice otherwise
                    bm, bn, bk, warps, stages = (int(v) for v in setting.split(":"))
                    launch = {"block_m": bm, "block_n": bn, "block_k": bk, "warps": warps, "stages": stages}
                try:
                    got = int8_mm.launch(x, ws[0], ss[0], **launch)
                    err = (got.float() - want.float()).abs().max().item() / max(want.float().abs().max().item(), 1e-9)
                    us[f"int8_mm {setting}"] = round(
                        timer(lambda i, launch=launch, x=x, ws=ws, ss=ss: int8_mm.launch(x, ws[i], ss[i], **launch)), 2
                    )
                    us[f"int8_mm {setting} rel_err"] = round(err, 6)
                except Exception as exc:  # a setting Triton cannot build here: report it, time the rest
                    us[f"int8_mm {setting}"] = f"{type(exc).__name__}: {str(exc)[:120]}"
            timed = {key: v for key, v in us.items()
                     if key.startswith("int8_mm") and not key.endswith("rel_err") and isinstance(v, float)}  # fmt: skip
            best = min(timed, key=timed.get) if timed else None
            row = {"rows": m, "n": n, "k": k, "us": us, "best": best,
                   "best_tb_s": round(n * k / timed[best] / 1e6, 2) if best else None,
                   "best_vs_pytorch_form": round(us["pytorch form"] / timed[best], 3) if best else None}  # fmt: skip
            rows_out.append(row)
            print(json.dumps(row), flush=True)
    return rows_out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--copies", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=20, help="timed graph replays (best of)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    meta = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "torch": torch.__version__,
            "machine": torch.cuda.get_device_name(), "python": platform.python_version()}  # fmt: skip
    out = {"meta": meta, "rows": run(args)}
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
