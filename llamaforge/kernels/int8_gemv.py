"""One row times an int8 weight matrix with per-output-row scales: the int8 weight-only product of batch-1 decoding.

Why a kernel of our own: in the compiled decode step on an H200 (Llama-3.2-1B shape, batch 1) the int8 model's
step was only 1.04-1.15x faster than bf16 although it reads half the weight bytes; about 0.35 ms of the ~1 ms step
is not weight reading and is the same in both, which puts the int8 weight reads at roughly 2.4 TB/s against 3.8 for
bf16. Inductor's reduction loads int8 with the same element counts per thread as bf16, so each load moves half the
bytes. Here each program streams `BLOCK_N` weight rows `BLOCK_K` int8 values at a time into a 2-D fp32 accumulator
(reduced once at the end), and the scale is applied once per output row.

`int8_gemv(x, weight, scale)` is a custom op (`torch.ops.llamaforge.int8_gemv`) that torch.compile traces into the
compiled step on CUDA (Triton through `torch.library.triton_op`) and that runs the PyTorch reference elsewhere.
`Int8Linear` routes to it only when `ENABLED` is set (off until it is measured on a GPU) and the input is one row
on CUDA.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Any

import torch
import torch.nn.functional as F

ENABLED = False  # Int8Linear / Int8Embedding.linear route one-row CUDA products here (benchmarks A/B it)
# Launch settings, module-level so a same-run A/B on the GPU can change them: output rows per program, int8 values
# per row per loop step, warps per program.
_BLOCK_N = 8
_BLOCK_K = 1024
_WARPS = 8


def reference(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (M, K) float; weight (N, K) int8; scale (N,) -> (M, N) in x's dtype (as `int8_weight_only_linear`)."""
    return F.linear(x, weight.to(x.dtype)) * scale.to(x.dtype)


def supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Shapes the kernel takes: one contiguous row, an int8 row-major matrix."""
    return (
        x.dim() == 2
        and x.size(0) == 1
        and x.stride(-1) == 1
        and weight.dtype == torch.int8
        and weight.dim() == 2
        and weight.stride(-1) == 1
        and x.size(1) == weight.size(1)
    )


@functools.cache
def _kernel() -> Any:
    import triton
    import triton.language as tl

    @triton.jit
    def int8_gemv_kernel(
        x_ptr, w_ptr, s_ptr, y_ptr, n_rows, k_len, stride_w,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < n_rows
        acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
        for k0 in range(0, k_len, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_ok = k < k_len
            x = tl.load(x_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + n[:, None] * stride_w + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0)
            acc += w.to(tl.float32) * x[None, :]
        y = tl.sum(acc, axis=1) * tl.load(s_ptr + n, mask=n_ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + n, y.to(y_ptr.dtype.element_ty), mask=n_ok)

    return int8_gemv_kernel


def launch(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    *,
    block_n: int | None = None,
    block_k: int | None = None,
    wrap: Any = None,
) -> torch.Tensor:
    """Run the Triton kernel (on CUDA, or on CPU tensors under TRITON_INTERPRET=1). `wrap` is
    torch.library.wrap_triton inside the custom op, so torch.compile can trace the launch."""
    import triton

    kernel = _kernel()
    if wrap is not None:
        kernel = wrap(kernel)
    n_rows, k_len = weight.shape
    block_n = block_n or _BLOCK_N
    block_k = min(block_k or _BLOCK_K, triton.next_power_of_2(k_len))
    y = torch.empty(1, n_rows, dtype=x.dtype, device=x.device)
    kernel[(triton.cdiv(n_rows, block_n),)](
        x, weight, scale, y, n_rows, k_len, weight.stride(0), BLOCK_N=block_n, BLOCK_K=block_k, num_warps=_WARPS
    )
    return y


if hasattr(torch.library, "triton_op"):  # torch >= 2.6

    @torch.library.triton_op("llamaforge::int8_gemv", mutates_args=())
    def int8_gemv(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """One row (1, K) times int8 `weight` (N, K), scaled per output row: (1, N) in x's dtype."""
        return launch(x, weight, scale, wrap=torch.library.wrap_triton)

    @int8_gemv.register_kernel("cpu")
    def _int8_gemv_cpu(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return reference(x, weight, scale)

else:  # older torch: no way to trace Triton launches into a compiled graph, so no kernel route

    def int8_gemv(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return reference(x, weight, scale)


_KERNEL_ROUTE = hasattr(torch.library, "triton_op") and importlib.util.find_spec("triton") is not None


def available(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether a product should run the kernel: switched on, CUDA tensors, Triton installed, torch with triton_op."""
    return ENABLED and _KERNEL_ROUTE and x.is_cuda and supported(x, weight)


def maybe_gemv(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor | None:
    """The kernel's product for x (..., K) holding one row, shaped like F.linear's output; None where it does not
    apply (the caller runs the matmul)."""
    row = x.reshape(1, x.size(-1)) if x.numel() == x.size(-1) else x
    if not available(row, weight):
        return None
    return int8_gemv(row, weight, scale).reshape(*x.shape[:-1], weight.size(0))
