"""One row times up to three weight matrices that share it (q/k/v, gate/up) in one launch: the matrix-vector
products of batch-1 decoding, for int8 weight-only layers and for plain bf16/fp16/fp32 weights.

Why a kernel of our own: in the compiled decode step on an H200 (Llama-3.2-1B shape, batch 1) the int8 model's
step was only 1.04-1.17x faster than bf16 although it reads half the weight bytes; about 0.35 ms of the ~1 ms step
is not weight reading and is the same in both, which puts the int8 weight reads at roughly 2.4 TB/s against 3.8 for
bf16. Inductor's reduction loads int8 with the same element counts per thread as bf16, so each load moves half the
bytes. For bf16, a standalone microbenchmark had a hand-written Triton GEMV at 4.0 TB/s for the stacked gate/up
matrix against inductor's 2.7 (3.6 inside the step) and 2.2-2.6 against 1.5-1.8 for o_proj and q/k/v. Here each
program streams `BLOCK_N` rows of one matrix `BLOCK_K` values at a time into a 2-D fp32 accumulator, reduced once
at the end; with split-K each row's length is cut into slices of whole tiles that separate programs sum, and the
op adds the slices (an addition inductor fuses into the consumer). Why split-K: in the H200 micro-benchmark the
int8 down_proj (2,048 rows of 8,192) streamed only ~1.8 TB/s with every setting tried, inductor's reduction too,
against ~2.5 for gate/up: few long rows leave the GPU short of programs. Timed there since (2026-12-02, sixth
session): no split setting was the fastest for any 1B product, so `_SPLIT_K` stays 1.

`gemv_rows(x, [w0, w1, w2])` is a custom op (`torch.ops.llamaforge.gemv_rows`) returning the fp32 sums of all rows
side by side, (1, N0 + N1 + N2) (for int8 weights unscaled). The decode graph pass
(`llamaforge.core.generation._gemv_pass`) emits it for every int8 weight-only product when `INT8` is True, for
every floating-point product when `FLOAT` is True, and, when they are None (the default), for the products listed
in `_MEASURED` for the GPU at hand; the int8 per-row scales stay in the graph, where inductor fuses them into
whatever consumes the product. Measured on an H200 (2026-12-02): the first build of the kernel could not vectorise
its loads (its row strides were excluded from Triton's specialisation; a CPU test now compiles it for sm_90 and
checks for 16-byte loads) and lost clearly (65 launches per token, 1,068 us against ~700 us of inductor's
reductions). The vectorised build wins on some products timed alone but not in the step (see `_MEASURED`), so by
default the decode step does not use it. torch.compile traces the op's Triton launch on CUDA
(`torch.library.triton_op`); elsewhere it runs the PyTorch reference.

A tensor-core form for int8 weights was built and timed on an H200 (2026-12-03, commit e14723e): the row written
per tile as three int8 base-254 digits (fp32-level precision), int8 x int8 wgmma, so no instruction per weight
value. It won no 1B product alone (int8 gate/up 17.9 us vs 16.9 here and 17.7 for inductor; the head 76.9 vs
73.6 for inductor) and made the int8 step slower (1.12 vs 0.89 ms), so it was removed: the int8 products are not
bound by per-weight instructions (benchmarks/results/gemv_micro_h200.json run3_mma). Nor by load rounds: a streaming
form (a persistent grid walking row tiles in one loop that Triton pipelines through asynchronous copies, commit
a20b853) won no int8 product either (2026-12-03: gate/up 13.97 vs 12.89 us for inductor, the head 82.1 vs 73.4;
run4_stream) and was removed.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F

from llamaforge.kernels import TRITON_OPS, row_tiles

# Which products the decode graph pass hands to this kernel: True every one-row product of that weight kind, False
# none, None (the default) the products measured faster than inductor's reduction on this GPU (`_MEASURED` below).
INT8: bool | None = None  # int8 weight-only products
FLOAT: bool | None = None  # products with bf16/fp16/fp32 weights
MAX_MATRICES = 3
# Launch settings, module-level so a same-run A/B on the GPU can change them: output rows per program, int8 values
# per row per loop step (a power of two), warps per program.
_BLOCK_N = 8
_BLOCK_K = 1024
_WARPS = 8
# Split-K: slices of each row's length that separate programs sum (the slices' sums then added in the graph, where
# inductor fuses the addition into the product's consumer). More programs for products with few, long rows
# (down_proj: 2,048 rows of 8,192), which otherwise leave much of the GPU without work.
_SPLIT_K = 1
# Per-product settings set by hand (benchmarks): (weight bytes per value, rows of all matrices together, K) ->
# (BLOCK_N, BLOCK_K, warps) or (BLOCK_N, BLOCK_K, warps, split-K). An entry wins over `_MEASURED` and the defaults.
_SETTINGS: dict[tuple[int, int, int], tuple[int, ...]] = {}
# Per GPU architecture (CUDA compute capability), the products to hand to this kernel by default, with their launch
# settings: entries go here only when the kernel made the whole decode step faster on that GPU. None does yet. On
# an H200 (torch 2.11, 2026-12-02) benchmarks/gemv_micro.py timed the kernel faster than inductor's reduction for
# some products alone (bf16 down_proj 10.46 vs 12.41 us and o_proj 4.35 vs 4.79; int8 o_proj 3.51 vs 4.67;
# benchmarks/results/gemv_micro_h200.json), but routing the bf16 pair to it in the decode step (decode_variants,
# same run) gave 1.038 ms per step against 1.012 without (kernels 983 vs 994 us: the products themselves were not
# the gap), so the table stays empty and the step keeps inductor's reductions. Int8 likewise (2026-12-02, sixth
# session): alone the kernel beat inductor for q/k/v (4.36 vs 6.08 us), gate/up (13.01 vs 14.24) and o_proj (3.14
# vs 6.33), and split-K helped no product; routing those three in the int8 decode step gave 0.888 ms per step and
# q/k/v + o_proj 0.936, against 0.850 and 0.952 for the unrouted step timed first and last in the same run
# (kernels 827 / 887 vs 831 / 934 us): no gain beyond the drift (benchmarks/results/int8_route_h200.json).
_MEASURED: dict[tuple[int, int], dict[tuple[int, int, int], tuple[int, ...]]] = {}


def _product_key(weights: list[torch.Tensor], k: int) -> tuple[int, int, int]:
    # int(): under torch.compile with dynamic shapes the sizes are SymInts, which neither hash nor pick a launch
    # setting; int() specialises the graph on them (a guard), as the constexpr tile sizes need anyway
    return (weights[0].element_size(), sum(int(w.size(0)) for w in weights), int(k))


def _measured_here(device: torch.device) -> dict[tuple[int, int, int], tuple[int, ...]]:
    if device.type != "cuda" or not torch.cuda.is_available():
        return {}
    return _MEASURED.get(torch.cuda.get_device_capability(device), {})


def settings_for(weights: list[torch.Tensor], k: int) -> tuple[int, ...]:
    """(BLOCK_N, BLOCK_K, warps[, split-K]) for one launch: a hand-set entry, else the measured one for this GPU,
    else the defaults (split-K, when an entry leaves it out: `_SPLIT_K`)."""
    key = _product_key(weights, k)
    if key in _SETTINGS:
        return _SETTINGS[key]
    return _measured_here(weights[0].device).get(key, (_BLOCK_N, _BLOCK_K, _WARPS))


def launch_tag() -> str:
    """The routing and launch settings in force, for the decode graph pass's cache key: a compiled graph that calls
    the kernel is only reused under the settings it was compiled with (inductor's on-disk cache outlives the
    process, and the benchmarks change the settings between processes)."""
    return (
        f"{INT8}-{FLOAT}-{_BLOCK_N}-{_BLOCK_K}-{_WARPS}-{_SPLIT_K}-{sorted(_SETTINGS.items())}-"
        f"{sorted(_MEASURED.items())}"
    )


def reference(x: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor:
    """x (1, K); weights (Ni, K), all of one dtype -> (1, sum Ni) fp32 sums (int8: unscaled)."""
    return torch.cat([F.linear(x.float(), w.float()) for w in weights], dim=-1)


def supported(x: torch.Tensor, weights: list[torch.Tensor]) -> bool:
    """Shapes the kernel takes: one contiguous row; one to three row-major matrices of its width and one dtype."""
    return (
        x.dim() == 2
        and x.size(0) == 1
        and x.size(1) > 1  # so no stride or length is 1, which Triton would turn into a constant of another type
        and x.stride(-1) == 1
        and 1 <= len(weights) <= MAX_MATRICES
        and len({w.dtype for w in weights}) == 1
        and all(w.dim() == 2 and w.stride(-1) == 1 and w.stride(0) >= w.size(1) == x.size(1) for w in weights)
    )


@functools.cache
def _kernel() -> Any:
    import triton
    import triton.language as tl

    # Row counts stay runtime integers (no specialisation of a 1 into a constant), so both branches below bind the
    # same types. The row strides and k_len must stay specialisable: their divisibility by 16 is what lets Triton
    # prove the weight tiles aligned and load them 16 bytes at a time. Excluding them too (as this kernel first
    # did) compiled every weight load to one 2-byte (bf16) or 1-byte (int8) load per value, and the kernel ran
    # slower than inductor's reductions in the H200 decode step; `supported` keeps both above 1.
    @triton.jit(do_not_specialize=["n0", "n1", "n2", "blocks0", "blocks01"])
    def rows_kernel(
        x_ptr, w0_ptr, w1_ptr, w2_ptr, y_ptr, n0, n1, n2, k_len, sw0, sw1, sw2, blocks0, blocks01, k_chunk, sy,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, INT8: tl.constexpr,
    ):  # fmt: skip
        pid = tl.program_id(0)
        part = tl.program_id(1)  # which slice of the row length (split-K); its sums go to row `part` of y
        # each program serves rows of one matrix: the first blocks0 programs matrix 0, then matrix 1, then 2
        if pid < blocks0:
            w_ptr, stride, rows, local, out0 = w0_ptr, sw0, n0, pid, n0 * 0
        elif pid < blocks01:
            w_ptr, stride, rows, local, out0 = w1_ptr, sw1, n1, pid - blocks0, n0
        else:
            w_ptr, stride, rows, local, out0 = w2_ptr, sw2, n2, pid - blocks01, n0 + n1
        n = local * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < rows
        acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
        k_start = part * k_chunk  # k_chunk is a multiple of BLOCK_K: the tiles stay aligned
        k_end = tl.minimum(k_start + k_chunk, k_len)
        for k0 in range(k_start, k_end, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_ok = k < k_end
            x = tl.load(x_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + n[:, None] * stride + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0)
            if INT8:  # exact widening through the float's bits: no I2F (a slow conversion) per value
                wf = (w.to(tl.int32) + 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0
            else:
                wf = w.to(tl.float32)
            acc += wf * x[None, :]
        tl.store(y_ptr + part * sy + out0 + n, tl.sum(acc, axis=1), mask=n_ok)

    return rows_kernel


def launch(
    x: torch.Tensor,
    weights: list[torch.Tensor],
    *,
    block_n: int | None = None,
    block_k: int | None = None,
    warps: int | None = None,
    split: int | None = None,
    wrap: Any = None,
) -> torch.Tensor:
    """Run the Triton kernel (on CUDA, or on CPU tensors under TRITON_INTERPRET=1). `wrap` is
    torch.library.wrap_triton inside the custom op, so torch.compile can trace the launch."""
    import triton

    kernel = _kernel()
    if wrap is not None:
        kernel = wrap(kernel)
    k_len = int(x.size(1))  # concrete even when traced with dynamic shapes (see _product_key)
    chosen_n, chosen_k, chosen_warps, *chosen_split = settings_for(list(weights), k_len)  # explicit arguments win
    block_n, block_k, warps = row_tiles(k_len, (block_n, block_k, warps), (chosen_n, chosen_k, chosen_warps))
    split = split or (chosen_split[0] if chosen_split else _SPLIT_K)
    k_chunk = triton.cdiv(triton.cdiv(k_len, split), block_k) * block_k  # whole tiles per slice
    split = triton.cdiv(k_len, k_chunk)  # no slice left empty
    ws = list(weights) + [weights[0]] * (MAX_MATRICES - len(weights))  # unused slots: no program reads them
    rows = [int(w.size(0)) for w in weights] + [0] * (MAX_MATRICES - len(weights))
    blocks = [triton.cdiv(r, block_n) for r in rows]
    y = torch.empty(split, sum(rows), dtype=torch.float32, device=x.device)
    kernel[(sum(blocks), split)](
        x, ws[0], ws[1], ws[2], y, rows[0], rows[1], rows[2], k_len,
        ws[0].stride(0), ws[1].stride(0), ws[2].stride(0), blocks[0], blocks[0] + blocks[1], k_chunk, y.stride(0),
        BLOCK_N=block_n, BLOCK_K=block_k, INT8=weights[0].dtype == torch.int8, num_warps=warps,
    )  # fmt: skip
    return y if split == 1 else y.sum(0, keepdim=True)


if hasattr(torch.library, "triton_op"):  # torch >= 2.6

    @torch.library.triton_op("llamaforge::gemv_rows", mutates_args=())
    def gemv_rows(x: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor:
        """One row (1, K) times each matrix (Ni, K): the fp32 sums side by side, (1, sum Ni) (int8: unscaled)."""
        return launch(x, weights, wrap=torch.library.wrap_triton)

    @gemv_rows.register_kernel("cpu")
    def _gemv_rows_cpu(x: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor:
        return reference(x, weights)

else:  # older torch: no way to trace Triton launches into a compiled graph, so no kernel route

    def gemv_rows(x: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor:
        return reference(x, weights)


def route_available(weights: list[torch.Tensor], k: int) -> bool:
    """Whether the decode graph pass may emit the op for this product (fake tensors of the weights it would read):
    switched on for its weight kind, or left to measurement (None) and listed in `_MEASURED` for this GPU; Triton
    installed; torch with triton_op."""
    on = INT8 if weights[0].dtype == torch.int8 else FLOAT
    if on is None:
        on = _product_key(weights, k) in _measured_here(weights[0].device)
    return bool(on) and TRITON_OPS
