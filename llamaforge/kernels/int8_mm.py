"""A few rows times an int8 weight-only matrix, reading the int8 weights as they are stored (eager CUDA calls).

Why: uncompiled, `int8_weight_only_linear` computes `F.linear(x, w.to(dtype)) * scale`: the cast writes a 16-bit
copy of every weight and the matmul reads it back, five bytes moved per weight instead of one. That is the path of
every prefill (captured as a CUDA graph but not compiled) and of eager decoding. On an H200 (Llama-3.2-1B shape,
2026-12-03 run29) the int8 model's fixed cost per `generate` call was 7.47 ms against 3.48 for bf16, although it
has half the weight bytes; with this kernel in the prefill it was 4.5-5.8 ms against 8.5-9.6 without it in the same
runs (run30/run31). Each program streams a tile of int8 rows once, widens them to the row's dtype in registers
(exact: int8 fits any float type's mantissa) and multiplies on tensor cores with fp32 sums; the epilogue rounds
like the PyTorch form (the product rounded to x's dtype, then times the scale, rounded again).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F

from llamaforge.kernels import TRITON_OPS

# Which eager calls take the kernel: True any CUDA call it supports, False none, None (the default) calls on CUDA
# with at most MAX_ROWS rows.
ENABLED: bool | None = None
MAX_ROWS = 64
# Launch settings: (rows of x per program (>= 16 for tensor-core products), weight rows per program, values per loop
# step, warps, pipeline stages), by product shape. H200, Llama-3.2-1B's int8 products, each timed alone over seven
# settings (2026-12-03, benchmarks/results/int8_mm_h200.json run2): wide matrices (gate/up, the head) 12.2 / 67-71 us
# with 16:64:256:4:3 for 1-16 rows (the PyTorch form 107-108 / 796-805 us; bf16 cuBLAS 18.5-18.9 / 126-131),
# 64:64:64:4:4 for 64 rows; narrow ones (k/v, q/o, down) 4.9-18.5 us with 16:16:256:4:3 for 1-16 rows (the PyTorch
# form 10-59 us), 16:32:256:4:3 for more. `launch` takes explicit settings for A/Bs (benchmarks/int8_mm_micro.py).


def settings_for(m: int, n: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) for m rows times an n-row matrix."""
    if n >= 8192:
        return (16, 64, 256, 4, 3) if m <= 32 else (64, 64, 64, 4, 4)
    return (16, 16 if m <= 16 else 32, 256, 4, 3)


def reference(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (..., K) in bf16/fp16/fp32; weight (N, K) int8; scale (N,): the PyTorch form, which int8_weight_only_linear
    runs wherever the kernel does not."""
    return F.linear(x, weight.to(x.dtype)) * scale.to(x.dtype)


def supported(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> bool:
    """Shapes the kernel takes: a float row block (..., K) with unit stride along K and at most MAX_ROWS rows (when
    not forced on), a row-major int8 (N, K) matrix, one scale per row."""
    rows = x.numel() // max(x.size(-1), 1)
    return (
        x.dtype in (torch.bfloat16, torch.float16)
        and x.dim() >= 2
        and x.size(-1) >= 16
        and x.stride(-1) == 1
        and 1 <= rows
        and (ENABLED is True or rows <= MAX_ROWS)
        and weight.dtype == torch.int8
        and weight.dim() == 2
        and weight.size(1) == x.size(-1)
        and weight.stride(-1) == 1
        and scale.shape == (weight.size(0),)
    )


def wanted(x: torch.Tensor) -> bool:
    """Whether an eager int8 weight-only product on x should take the kernel: not while torch.compile traces
    (compiled graphs fuse the cast into their own reductions) and not when autograd must reach x (the kernel has no
    backward; LoRA on an int8 base needs the gradient through the frozen product)."""
    if ENABLED is False or not TRITON_OPS or x.device.type != "cuda":
        return False
    if x.requires_grad and torch.is_grad_enabled():
        return False
    return not torch.compiler.is_compiling() and _tensor_cores(x.device.index)


@functools.cache
def _tensor_cores(index: int | None) -> bool:
    """Whether the GPU has the bf16/fp16 tensor-core products the kernel is written with (compute capability 8.0+:
    Ampere and newer); older GPUs keep the PyTorch form."""
    return torch.cuda.get_device_capability(index) >= (8, 0)


@functools.cache
def _kernel() -> Any:
    from llamaforge.kernels.fused_triton import int8_mm_kernel

    return int8_mm_kernel


def launch(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
    warps: int | None = None,
    stages: int | None = None,
) -> torch.Tensor:
    """Run the Triton kernel (on CUDA, or on CPU tensors under TRITON_INTERPRET=1): x @ weight.T * scale in x's
    dtype, shaped (..., N)."""
    import triton

    k_len, n = x.size(-1), weight.size(0)
    rows = x.reshape(-1, k_len)
    scale = scale.to(x.dtype)  # as the PyTorch form rounds it (a no-op for scales kept in the model's dtype)
    m = rows.size(0)
    chosen = settings_for(m, n)  # explicit arguments win
    block_m, block_n = block_m or chosen[0], block_n or chosen[1]
    block_k = min(block_k or chosen[2], max(16, triton.next_power_of_2(k_len)))
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m))
    _kernel()[grid](
        rows, weight, scale, y, m, n, k_len, rows.stride(0), weight.stride(0), y.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps or chosen[3], num_stages=stages or chosen[4],
    )  # fmt: skip
    return y.view(*x.shape[:-1], n)
