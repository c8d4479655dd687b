"""One decoding step's feed-forward front half for one layer, in one launch (batch 1): the block's RMSNorm, the gate
and up products and SiLU(gate) * up.

Why: in the compiled batch-1 decode step on an H200 (Llama-3.2-1B shape, bf16; 2026-12-02 run18) each layer runs the
post-attention RMSNorm (2.2-2.8 us), the stacked gate/up reduction (18.4 us, 3.65 TB/s) and SiLU(gate) * up (1.0 us);
a hand-written Triton GEMV streamed the stacked gate/up matrix at 4.0 TB/s alone in an earlier micro-benchmark. Here
every program takes the normalised row (each program computes the row's statistics itself: a few KB from L2), reduces
the same few rows of the gate and up matrices side by side and writes SiLU(gate) * up for them, so the two small
kernels go. The switches are `llamaforge.core.model._FUSED_GATE_UP` (plain weights) and `_FUSED_GATE_UP_INT8`
(int8 weight-only), both on for CUDA. int8 since the fifteenth session (the H200 step 0.729 / 0.753 ms against 0.842,
2026-12-03); bf16 since the seventeenth, once its launch setting was swept again with the weights loaded first: 16
rows per program took 317-322 us per step in six fresh processes on three machines against 279-288 + 27 + 17 us
(reduction, norm, SiLU) for inductor's kernels in two (its gate/up reduction alone has taken 275-327 us across
processes of one code, its coordinate-descent tuning landing differently), and the step 0.893-0.898 ms
(1,099-1,104 tok/s end to end) against 0.911-0.915 (1,075-1,084); it lost at 8 rows per program (340 us) and
earlier, with the weights loaded after the row (21.2 vs 20.7 us alone, 0.946 vs 0.917 ms per step).
benchmarks/results/decode_variants_h200.json run43-45.

Arithmetic, as the compiled decode step does it: the RMSNorm's roundings (normalised row, then times its weight),
fp32 sums rounded to the model's dtype (each linear's output; int8 weight-only: times the row's scale, rounded
again), then SiLU(gate) * up in fp32 and one rounding at the store. `reference` is the same in PyTorch.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F

from llamaforge.kernels import operands_supported, pack_extras, rms_row, row_products, row_tiles, unpack_extras

# Launch settings, by bytes per weight: rows of each matrix per program, values per row per loop step, warps per
# program; fixed per weight kind, never tuned per process (the point of the kernel). H200 sweep alone, 1B shape
# (2026-12-03, benchmarks/results/fused_micro_h200.json "products"): bf16 16:512:4 20.1 us per call (8:512:4 21.3,
# inductor's unfused chain 19.1 alone, 20-23 in the step); int8 8:512:4 14.45 (best 8:512:8, 14.16: within the
# step's drift). fp16 and fp32 weights take the bf16 setting (not timed).
_DEFAULT = (16, 512, 4)
_SETTINGS: dict[int, tuple[int, int, int]] = {1: (8, 512, 4)}
# Overrides of all three for same-run A/Bs (decode_variants gate_up_block_n / _block_k / _warps); None: the above.
_BLOCK_N: int | None = None
_BLOCK_K: int | None = None
_WARPS: int | None = None


def settings_for(weight: torch.Tensor) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, warps) for this weight's element size, the overrides laid over them."""
    defaults = _SETTINGS.get(weight.element_size(), _DEFAULT)
    return tuple(o or d for o, d in zip((_BLOCK_N, _BLOCK_K, _WARPS), defaults, strict=True))  # type: ignore[return-value]


def launch_tag() -> str:
    """The launch settings in force, for the decode step's compile cache key (see qkv_rope.launch_tag)."""
    return f"gate_up-{_DEFAULT}-{sorted(_SETTINGS.items())}-{_BLOCK_N}-{_BLOCK_K}-{_WARPS}"


def reference(
    x: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    scales: tuple[torch.Tensor, torch.Tensor] | None = None,
    norm: tuple[torch.Tensor, float] | None = None,
) -> torch.Tensor:
    """x (1, K); w_gate, w_up (N, K) in x's dtype, or int8 with per-row `scales` in x's dtype; `norm`: an RMSNorm's
    (weight, eps) applied to x first. Returns SiLU(x @ w_gate.T) * (x @ w_up.T), (1, N) in x's dtype."""
    gate, up = row_products(rms_row(x, norm), (w_gate, w_up), scales, x.dtype)
    return (F.silu(gate) * up).to(x.dtype)


def supported(
    x: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    scales: tuple[torch.Tensor, torch.Tensor] | None = None,
    norm: tuple[torch.Tensor, float] | None = None,
) -> bool:
    """Shapes and layouts the kernel takes (tensor metadata only: this runs inside the traced decode step)."""
    return w_gate.shape == w_up.shape and operands_supported(x, (w_gate, w_up), scales, norm)


@functools.cache
def _kernel() -> Any:
    from llamaforge.kernels.fused_triton import gate_up_kernel

    return gate_up_kernel


def launch(
    x: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    scales: tuple[torch.Tensor, torch.Tensor] | None = None,
    norm: tuple[torch.Tensor, float] | None = None,
    *,
    block_n: int | None = None,
    block_k: int | None = None,
    warps: int | None = None,
    wrap: Any = None,
) -> torch.Tensor:
    """Run the Triton kernel (on CUDA, or on CPU tensors under TRITON_INTERPRET=1); `wrap` is
    torch.library.wrap_triton inside the custom op, so torch.compile can trace the launch."""
    kernel = wrap(_kernel()) if wrap is not None else _kernel()
    n_rows, k_len = int(w_gate.size(0)), int(x.size(1))
    block_n, block_k, warps = row_tiles(k_len, (block_n, block_k, warps), settings_for(w_gate))
    out = torch.empty(1, n_rows, dtype=x.dtype, device=x.device)
    sg, su = scales if scales is not None else (x, x)  # unread without INT8
    g, eps = norm if norm is not None else (x, 0.0)  # unread without NORM
    kernel[(-(-n_rows // block_n),)](
        x, w_gate, w_up, sg, su, g, out, float(eps), n_rows, k_len, w_gate.stride(0), w_up.stride(0),
        BLOCK_N=block_n, BLOCK_K=block_k, INT8=scales is not None, NORM=norm is not None, num_warps=warps,
    )  # fmt: skip
    return out


@torch.library.custom_op("llamaforge::gate_up_silu_reference", mutates_args=())
def _reference_op(
    x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, scales: list[torch.Tensor],
    norm_weight: list[torch.Tensor], eps: float,
) -> torch.Tensor:  # fmt: skip
    """The PyTorch reference as an opaque op (compiled graphs off CUDA keep it whole, like the kernel on CUDA)."""
    return reference(x, w_gate, w_up, *unpack_extras(scales, norm_weight, eps))


@_reference_op.register_fake
def _(x, w_gate, w_up, scales, norm_weight, eps):
    return x.new_empty(1, w_gate.size(0))


if hasattr(torch.library, "triton_op"):  # torch >= 2.6

    @torch.library.triton_op("llamaforge::gate_up_silu", mutates_args=())
    def _triton_op(
        x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, scales: list[torch.Tensor],
        norm_weight: list[torch.Tensor], eps: float,
    ) -> torch.Tensor:  # fmt: skip
        return launch(x, w_gate, w_up, *unpack_extras(scales, norm_weight, eps), wrap=torch.library.wrap_triton)

else:  # older torch: no way to trace Triton launches into a compiled graph
    _triton_op = None


def gate_up_silu(
    x: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    scales: tuple[torch.Tensor, torch.Tensor] | None = None,
    norm: tuple[torch.Tensor, float] | None = None,
) -> torch.Tensor:
    """SiLU(gate) * up of one (optionally RMS-normalised) row: the Triton kernel on CUDA (a custom op torch.compile
    traces), the reference elsewhere."""
    op = _triton_op if x.device.type == "cuda" and _triton_op is not None else _reference_op
    return op(x, w_gate, w_up, *pack_extras(scales, norm))
