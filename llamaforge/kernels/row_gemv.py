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
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F

from llamaforge.kernels import TRITON_OPS

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
# int8 weights on tensor cores (`_mma_kernel`): the row split into three int8 digits per tile, int8 x int8 -> int32
# products, no per-weight conversion at all. Off until the H200 decode step says otherwise; `_STAGES` is its
# software-pipelining depth (tiles in flight per program).
_INT8_MMA = False
# bf16/fp16 weights on tensor cores too (the row as hi + lo values of the weights' type in a 16-column operand):
# asynchronous multi-stage copies of the weight tiles, against inductor's reductions, which load as they go
_FLOAT_MMA = False
_STAGES = 3
_MMA_BLOCK_N = 64
_MMA_BLOCK_K = 256
_MMA_WARPS = 4
_MMA_SPLIT_K = 0  # 0: automatic (about two programs per SM)
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


def settings_for(weights: list[torch.Tensor], k: int, mma: bool = False) -> tuple[int, ...]:
    """(BLOCK_N, BLOCK_K, warps[, split-K[, stages]]) for one launch: a hand-set entry, else the measured one for
    this GPU, else the defaults of the kernel form (split-K, when an entry leaves it out: `_SPLIT_K`, or
    `_MMA_SPLIT_K` for the tensor-core form)."""
    key = _product_key(weights, k)
    if key in _SETTINGS:
        return _SETTINGS[key]
    default = (_MMA_BLOCK_N, _MMA_BLOCK_K, _MMA_WARPS) if mma else (_BLOCK_N, _BLOCK_K, _WARPS)
    return _measured_here(weights[0].device).get(key, default)


def launch_tag() -> str:
    """The routing and launch settings in force, for the decode graph pass's cache key: a compiled graph that calls
    the kernel is only reused under the settings it was compiled with (inductor's on-disk cache outlives the
    process, and the benchmarks change the settings between processes)."""
    return (
        f"{INT8}-{FLOAT}-{_BLOCK_N}-{_BLOCK_K}-{_WARPS}-{_SPLIT_K}-{_INT8_MMA}-{_FLOAT_MMA}-{_STAGES}-{_MMA_BLOCK_N}-"
        f"{_MMA_BLOCK_K}-{_MMA_WARPS}-{_MMA_SPLIT_K}-{sorted(_SETTINGS.items())}-{sorted(_MEASURED.items())}"
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


@functools.cache
def _mma_kernel() -> Any:
    """The int8 form on tensor cores. Why: on an H200 every int8 GEMV built from per-value widening (inductor's
    I2F conversions, or `_kernel`'s float-bit trick) streamed ~2.5 TB/s at best, bound by the 3-4 instructions
    each weight value costs, not by memory. An int8 x int8 tensor-core product needs no instruction per weight
    value, so the row is brought to int8 instead, exactly enough to stay weight-only in effect: per tile of
    `BLOCK_K` values, x / s (s = the tile's max |x| / 127) is written as three base-254 digits d0 + d1/254 +
    d2/254**2 (each in [-127, 127]), which reproduce x to ~6e-8 of the tile's largest value, finer than fp32
    rounding of most of its values and far below bf16's. The digits are columns 0-2 of a 16-column int8 operand
    (the smallest a dot takes; the others zero), the int32 products are exact, and each tile's three columns are
    scaled back and added in fp32. bf16/fp16 weights take the row as two values of their type (hi and the
    remainder lo, so an fp32 row keeps 16 significant bits; a row of the weights' own type is exact), products
    accumulated in fp32 by the tensor cores; there the point is the multi-stage asynchronous weight copies."""
    import triton
    import triton.language as tl

    @triton.jit(do_not_specialize=["n0", "n1", "n2", "blocks0", "blocks01"])
    def mma_kernel(
        x_ptr, w0_ptr, w1_ptr, w2_ptr, y_ptr, n0, n1, n2, k_len, sw0, sw1, sw2, blocks0, blocks01, k_chunk, sy,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr, INT8: tl.constexpr,
    ):  # fmt: skip
        pid = tl.program_id(0)
        part = tl.program_id(1)
        if pid < blocks0:
            w_ptr, stride, rows, local, out0 = w0_ptr, sw0, n0, pid, n0 * 0
        elif pid < blocks01:
            w_ptr, stride, rows, local, out0 = w1_ptr, sw1, n1, pid - blocks0, n0
        else:
            w_ptr, stride, rows, local, out0 = w2_ptr, sw2, n2, pid - blocks01, n0 + n1
        n = local * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < rows
        col = tl.arange(0, 16)[None, :]
        acc = tl.zeros((BLOCK_N, 16), tl.float32)
        k_start = part * k_chunk
        k_end = tl.minimum(k_start + k_chunk, k_len)
        for k0 in tl.range(k_start, k_end, BLOCK_K, num_stages=STAGES):
            k = k0 + tl.arange(0, BLOCK_K)
            k_ok = k < k_end
            w = tl.load(w_ptr + n[:, None] * stride + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0)
            x = tl.load(x_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
            if INT8:
                top = tl.max(tl.abs(x), axis=0)
                s = tl.where(top > 0, top / 127.0, 1.0)
                r = x / s  # in [-127, 127]
                d0 = tl.floor(r + 0.5)
                r = (r - d0) * 254.0  # the remainder, in [-127, 127]
                d1 = tl.floor(r + 0.5)
                d2 = tl.floor((r - d1) * 254.0 + 0.5)
                digits = tl.where(col == 2, d2[:, None], 0.0)
                digits = tl.where(col == 0, d0[:, None], tl.where(col == 1, d1[:, None], digits))
                prod = tl.dot(w, digits.to(tl.int8), out_dtype=tl.int32)  # (BLOCK_N, 16), exact
                acc += prod.to(tl.float32) * s
            else:  # 16-bit weights: the row as two values of their type (hi + lo: an fp32 row keeps 16 bits)
                hi = x.to(w.dtype)
                lo = (x - hi.to(tl.float32)).to(w.dtype)
                parts = tl.where(col == 0, hi[:, None], tl.where(col == 1, lo[:, None], 0.0)).to(w.dtype)
                acc = tl.dot(w, parts, acc)
        if INT8:
            place = tl.where(col == 0, 1.0, tl.where(col == 1, 1.0 / 254.0, tl.where(col == 2, 1.0 / 64516.0, 0.0)))
        else:
            place = tl.where(col < 2, 1.0, 0.0)
        tl.store(y_ptr + part * sy + out0 + n, tl.sum(acc * place, axis=1), mask=n_ok)

    return mma_kernel


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 132  # the interpreter on the CPU: an H100/H200's count, so its split choices are the GPU's
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def launch(
    x: torch.Tensor,
    weights: list[torch.Tensor],
    *,
    block_n: int | None = None,
    block_k: int | None = None,
    warps: int | None = None,
    split: int | None = None,
    mma: bool | None = None,
    stages: int | None = None,
    wrap: Any = None,
) -> torch.Tensor:
    """Run the Triton kernel (on CUDA, or on CPU tensors under TRITON_INTERPRET=1). `wrap` is
    torch.library.wrap_triton inside the custom op, so torch.compile can trace the launch. `mma` picks the
    tensor-core form (default `_INT8_MMA` for int8 weights, `_FLOAT_MMA` for bf16/fp16 ones, never for fp32); its
    split-K, unless set, gives the GPU about two programs per SM."""
    import triton

    int8 = weights[0].dtype == torch.int8
    if weights[0].dtype not in (torch.int8, torch.bfloat16, torch.float16):
        mma = False  # fp32 weights: a tensor-core product would round them (TF32)
    elif mma is None:
        mma = _INT8_MMA if int8 else _FLOAT_MMA
    kernel = _mma_kernel() if mma else _kernel()
    if wrap is not None:
        kernel = wrap(kernel)
    k_len = int(x.size(1))  # concrete even when traced with dynamic shapes (see _product_key)
    chosen = settings_for(list(weights), k_len, mma=mma)
    chosen_n, chosen_k, chosen_warps, *rest = chosen  # explicit arguments win
    block_n, warps = block_n or chosen_n, warps or chosen_warps
    block_k = min(block_k or chosen_k, triton.next_power_of_2(k_len))
    if mma:  # a dot's smallest tiles: 16 rows, 32 int8 values deep
        block_n, block_k = max(block_n, 16), max(block_k, 32)
    ws = list(weights) + [weights[0]] * (MAX_MATRICES - len(weights))  # unused slots: no program reads them
    rows = [int(w.size(0)) for w in weights] + [0] * (MAX_MATRICES - len(weights))
    blocks = [triton.cdiv(r, block_n) for r in rows]
    split = split or (rest[0] if rest else (_MMA_SPLIT_K if mma else _SPLIT_K))
    if not split:  # automatic: about two programs per SM, never a slice shorter than one tile
        split = max(1, min(triton.cdiv(k_len, block_k), round(2 * _sm_count(x.device) / sum(blocks))))
    k_chunk = triton.cdiv(triton.cdiv(k_len, split), block_k) * block_k  # whole tiles per slice
    split = triton.cdiv(k_len, k_chunk)  # no slice left empty
    y = torch.empty(split, sum(rows), dtype=torch.float32, device=x.device)
    common = (
        x, ws[0], ws[1], ws[2], y, rows[0], rows[1], rows[2], k_len,
        ws[0].stride(0), ws[1].stride(0), ws[2].stride(0), blocks[0], blocks[0] + blocks[1], k_chunk, y.stride(0),
    )  # fmt: skip
    if mma:
        stages = stages or (rest[1] if len(rest) > 1 else _STAGES)
        kernel[(sum(blocks), split)](
            *common, BLOCK_N=block_n, BLOCK_K=block_k, STAGES=stages, INT8=int8, num_warps=warps
        )
    else:
        kernel[(sum(blocks), split)](*common, BLOCK_N=block_n, BLOCK_K=block_k, INT8=int8, num_warps=warps)
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
