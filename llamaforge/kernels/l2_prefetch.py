"""Ask the GPU to bring weight bytes into its L2 cache ahead of the kernels that will read them (Hopper and newer).

Why: batch-1 decoding reads every weight once per token, and on an H200 the small products of a layer (q/k/v,
o_proj; and every int8 product) stream far below the memory's bandwidth, because each kernel pays a fixed ramp and
tail (2-4 us) around a few microseconds of reading. Between them sit kernels that read almost nothing (one-query
attention, ~6 us per layer), while the memory bus idles. A prefetch issued as the layer's q/k/v kernel starts keeps
the memory streaming the next products' weights (o_proj, gate/up: up to `BUDGET_MB`) into L2 while attention runs,
so those products then read from L2. `cp.async.bulk.prefetch.L2` (sm_90) is fire-and-forget: one instruction per
64 KB chunk, no registers or shared memory, nothing waits for it; the prefetched bytes change where later reads are
served from, never what they return.

The decode step issues it from extra programs of the fused q/k/v + RoPE kernel (`llamaforge.kernels.qkv_rope`), so
it costs no launch of its own; `launch` is the standalone form (benchmarks/prefetch_micro.py).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch

# Whether batch-1 decode steps prefetch each layer's o_proj and gate/up weights during its attention: True on CUDA
# GPUs of compute capability 9.0+ with the fused q/k/v kernel in use, False never. Off until timed in the decode step.
ENABLED = False
BUDGET_MB = 40  # most bytes prefetched per layer (an H200's L2 holds 50 MB)
MAX_SEGMENTS = 3  # tensors one prefetch covers (o_proj, gate, up)
_CHUNK = 1 << 16  # bytes per prefetch instruction (a multiple of 16)
_BLOCK = 128  # chunks per program: one per thread at 4 warps


def launch_tag() -> str:
    """The settings in force, for the decode step's compile cache key (see qkv_rope.launch_tag)."""
    return f"l2pf-{ENABLED}-{BUDGET_MB}-{_CHUNK}-{_BLOCK}"


def available(device: torch.device) -> bool:
    """A CUDA GPU of compute capability 9.0+ (where the bulk prefetch instruction exists) with Triton installed."""
    from llamaforge.kernels import TRITON_OPS

    if device.type != "cuda" or not TRITON_OPS or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device)[0] >= 9


def within_budget(tensors: Sequence[torch.Tensor], budget: int) -> list[torch.Tensor]:
    """The tensors in order, up to `budget` bytes: the last one that fits partly is cut to its leading rows (the rows
    a product's first programs read). Tensors must be contiguous; tensor metadata only (runs inside traced steps)."""
    out: list[torch.Tensor] = []
    left = budget
    for t in tensors:
        if len(out) == MAX_SEGMENTS or left <= 0:
            break
        size = t.numel() * t.element_size()
        if size <= left:
            out.append(t)
            left -= size
            continue
        row = t[0].numel() * t.element_size() if t.dim() > 1 else t.element_size()
        rows = left // row
        if rows:
            out.append(t[:rows])
        break
    return out


def plan(tensors: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], list[int], list[int], int]:
    """The kernels' arguments for prefetching `tensors` (contiguous, 16-byte multiples): byte views padded to
    MAX_SEGMENTS, their byte counts (0 for padding), the program bounds of segments 0 and 1, and the program count."""
    segs = [t.reshape(-1).view(torch.uint8) for t in tensors]
    sizes = [s.numel() for s in segs]
    per = _CHUNK * _BLOCK
    counts = [-(-n // per) for n in sizes]
    bounds = [counts[0], counts[0] + (counts[1] if len(counts) > 1 else 0)]
    pad = MAX_SEGMENTS - len(segs)
    return segs + [segs[0]] * pad, sizes + [0] * pad, bounds, sum(counts)


def supported(tensors: Sequence[torch.Tensor]) -> bool:
    """Tensors the kernel can prefetch: one to MAX_SEGMENTS contiguous CUDA tensors of whole 16-byte units."""
    return 1 <= len(tensors) <= MAX_SEGMENTS and all(
        t.is_cuda and t.is_contiguous() and (t.numel() * t.element_size()) % 16 == 0 and t.numel() > 0 for t in tensors
    )


@functools.cache
def _kernel() -> Any:
    from llamaforge.kernels.fused_triton import l2_prefetch_kernel

    return l2_prefetch_kernel


def launch(tensors: Sequence[torch.Tensor]) -> None:
    """Prefetch the bytes of one to three contiguous CUDA tensors into L2 (asynchronously: returns at once)."""
    if not supported(tensors):
        raise ValueError(f"l2_prefetch takes 1 to {MAX_SEGMENTS} contiguous CUDA tensors of whole 16-byte units")
    segs, sizes, bounds, programs = plan(tensors)
    _kernel()[(programs,)](
        segs[0], sizes[0], segs[1], sizes[1], segs[2], sizes[2], bounds[0], bounds[1],
        CHUNK=_CHUNK, BLOCK=_BLOCK, num_warps=4,
    )  # fmt: skip
