"""One row times one weight matrix plus the residual stream, in one launch (batch-1 decoding): a block's o_proj and
down_proj with the residual additions that follow them, `residual + x @ W.T`, for plain and int8 weight-only
weights.

Why: in the compiled int8 decode step on an H200 (Llama-3.2-1B shape, batch 1) these two products are inductor's
reductions, whose coordinate-descent tuning picks launch settings that differ between processes of the same code: in
six fresh processes of one day (2026-12-03, decode_variants_h200.json run40/run41) the int8 o_proj took 56-124 us
per step and down_proj 136-178, the whole step 0.727-0.814 ms. Routed through the row GEMV kernel (fixed settings)
they took 191 us together, but the residual additions and scales then ran as 30 pointwise kernels more (35 us): here
the epilogue is in the product's own kernel, and the step went from 0.733 to 0.681 ms (int8) and from 0.970 to 0.906
ms (bf16). The switches are `PLAIN` (plain weights) and `INT8` (int8 weight-only), both on for CUDA.

Arithmetic, as the unfused step does it: fp32 sums rounded to the model's dtype (the linear's output; int8: times the
row's scale, rounded again), then the residual added in fp32 and rounded once. `reference` is the same in PyTorch.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from llamaforge.kernels import fused_projections, operands_supported, row_products, row_tiles

# Which one-row inference calls `add_linear` hands to the kernel, per weight kind: True on any device (CPUs run the
# op's PyTorch reference: the tests), None (the default) on CUDA only, False never. H200, 1B shape, batch 1, 16 + 256
# tokens, fresh processes of one run (2026-12-03, decode_variants_h200.json run42): int8 weight-only 1,424.6 /
# 1,433.2 tok/s end to end with it (0.681 ms per step; the kernel 119.2 us per step for down_proj, 54.7 for o_proj)
# against 1,335.8 without (0.733 ms), and the two processes with it decoded the same tokens (no tuned reduction left
# to differ); bf16 1,088.5 (0.906 ms; 158.0 + 70.7 us) against 1,018.6 (0.970 ms).
PLAIN: bool | None = None  # bf16/fp16/fp32 weights (nn.Linear)
INT8: bool | None = None  # int8 weight-only (Int8Linear)
# Launch settings (module-level for same-run A/Bs): output rows per program, values per row per loop step, warps per
# program, by (bytes per weight, row length); others take `_DEFAULT`. From the H200 row GEMV sweeps (the same loop;
# benchmarks/results/gemv_micro_h200.json): int8 down_proj (8,192 long) 8.48 us at 8:2048:8, bf16 down_proj 10.46 at
# 4:2048:4, int8 o_proj (2,048) 3.14-3.51 at 4:1024:4.
_DEFAULT = (4, 1024, 4)
_SETTINGS: dict[tuple[int, int], tuple[int, int, int]] = {(1, 8192): (8, 2048, 8), (2, 8192): (4, 2048, 4)}


def settings_for(weight: torch.Tensor, k_len: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, warps) for this weight's element size and row length: fixed per shape, never tuned per
    process (the point of the kernel)."""
    return _SETTINGS.get((weight.element_size(), int(k_len)), _DEFAULT)


def launch_tag() -> str:
    """The launch settings in force, for the decode step's compile cache key (see qkv_rope.launch_tag)."""
    return f"residual_gemv-{_DEFAULT}-{sorted(_SETTINGS.items())}"


def reference(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None, residual: torch.Tensor
) -> torch.Tensor:
    """x (1, K); weight (N, K) in x's dtype, or int8 with per-row `scale` (N,) in x's dtype; residual (1, N) in x's
    dtype. Returns residual + x @ weight.T with the linear's roundings, (1, N) in x's dtype."""
    (y,) = row_products(x.float(), (weight,), (scale,) if scale is not None else None, x.dtype)
    return (residual.float() + y).to(x.dtype)


def supported(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None, residual: torch.Tensor) -> bool:
    """Shapes and layouts the kernel takes (tensor metadata only: this runs inside the traced decode step)."""
    return (
        operands_supported(x, (weight,), (scale,) if scale is not None else None, None)
        and residual.dtype == x.dtype
        and residual.shape == (1, weight.size(0))
        and residual.stride(-1) == 1
    )


@functools.cache
def _kernel() -> Any:
    from llamaforge.kernels.fused_triton import residual_gemv_kernel

    return residual_gemv_kernel


def launch(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor | None,
    residual: torch.Tensor,
    *,
    block_n: int | None = None,
    block_k: int | None = None,
    warps: int | None = None,
    wrap: Any = None,
) -> torch.Tensor:
    """Run the Triton kernel (on CUDA, or on CPU tensors under TRITON_INTERPRET=1); `wrap` is
    torch.library.wrap_triton inside the custom op, so torch.compile can trace the launch."""
    kernel = wrap(_kernel()) if wrap is not None else _kernel()
    n_rows, k_len = int(weight.size(0)), int(x.size(1))
    block_n, block_k, warps = row_tiles(k_len, (block_n, block_k, warps), settings_for(weight, k_len))
    out = torch.empty(1, n_rows, dtype=x.dtype, device=x.device)
    kernel[(-(-n_rows // block_n),)](
        x, weight, scale if scale is not None else x, residual, out, n_rows, k_len, weight.stride(0),
        BLOCK_N=block_n, BLOCK_K=block_k, INT8=scale is not None, num_warps=warps,
    )  # fmt: skip
    return out


@torch.library.custom_op("llamaforge::residual_linear_reference", mutates_args=())
def _reference_op(
    x: torch.Tensor, weight: torch.Tensor, scale: list[torch.Tensor], residual: torch.Tensor
) -> torch.Tensor:
    """The PyTorch reference as an opaque op (compiled graphs off CUDA keep it whole, like the kernel on CUDA)."""
    return reference(x, weight, scale[0] if scale else None, residual)


@_reference_op.register_fake
def _(x, weight, scale, residual):
    return x.new_empty(1, weight.size(0))


if hasattr(torch.library, "triton_op"):  # torch >= 2.6

    @torch.library.triton_op("llamaforge::residual_linear", mutates_args=())
    def _triton_op(
        x: torch.Tensor, weight: torch.Tensor, scale: list[torch.Tensor], residual: torch.Tensor
    ) -> torch.Tensor:
        return launch(x, weight, scale[0] if scale else None, residual, wrap=torch.library.wrap_triton)

else:  # older torch: no way to trace Triton launches into a compiled graph
    _triton_op = None


def residual_linear(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None, residual: torch.Tensor
) -> torch.Tensor:
    """residual + x @ weight.T for one row (int8: with per-row scales): the Triton kernel on CUDA (a custom op
    torch.compile traces), the reference elsewhere."""
    op = _triton_op if x.device.type == "cuda" and _triton_op is not None else _reference_op
    return op(x, weight, [scale] if scale is not None else [], residual)


def add_linear(linear: torch.nn.Module, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """residual + linear(x): a one-row inference call goes through the kernel where the switch of the linear's
    weight kind (`PLAIN`, `INT8`) allows it and the layout fits; everything else (training, several rows, adapters,
    biases, other quantizers) computes the two steps as written."""
    if x.shape[:-1].numel() == 1 and not torch.is_grad_enabled():
        kind = fused_projections(PLAIN, x, (linear,), INT8)
        if kind is not None:
            row, res = x.reshape(1, x.size(-1)), residual.reshape(1, residual.size(-1))
            scale = linear.weight_scale if kind == "int8" else None
            if supported(row, linear.weight, scale, res):
                return residual_linear(row, linear.weight, scale, res).view(residual.shape)
    return residual + linear(x)
