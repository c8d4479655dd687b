"""One-query attention over a static KV cache (flash-decoding), for the decode step on CUDA.

Why a kernel of our own: in the compiled decode step of a Llama-3.2-1B shape at batch 1 on an H200, cuDNN's
attention took 5.7-6.0 us per layer plus ~1.4 us per step to turn the boolean mask into its additive form, and it
reads the whole static cache whatever the position: a cache sized for 2,048 tokens costs as much at token 20 as at
token 2,000. Here
- the model's `AttentionMask.extent` (per row, no allowed key at or past it) bounds the work, so a step reads only
  the keys and values written so far;
- the grouped query heads that share a key/value head are handled by one program, so keys and values are read
  once per group, not once per query head;
- the cache length can be split over programs (partial softmax statistics, then one combining pass) so a single
  long sequence still spreads over the GPU; with one split the program writes its output directly;
- the mask is read as bytes (in the compiled step their conversion fuses into the kernel computing the mask);
- with `DOT` the block products run on tensor cores (16-bit inputs; the query group padded to 16 rows).

`decode_attention(q, k, v, allowed, scale, extent)` is a custom op (`torch.ops.llamaforge.decode_attention`) that
torch.compile traces into the compiled step on CUDA (Triton through `torch.library.triton_op`) and that runs the
PyTorch reference elsewhere.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch

from llamaforge.kernels import TRITON_OPS

# Launch settings, module-level so a same-run A/B on the GPU can change them (benchmarks/decode_variants.py,
# benchmarks/fused_micro.py): a fixed number of cache-length splits instead of plan()'s, positions per loop step
# (None: 128 with one split, else 64, on tensor cores; 32 without), warps per program, tensor-core block products
# for 16-bit inputs.
_SPLITS: int | None = None
_BLOCK: int | None = None
_WARPS = 4
_DOT = True
# Positions of the cache per split at least (plan()): below that the combining pass and each program's fixed
# latency cost more than the parallelism gains.
_MIN_SPLIT = 256
# H200, Llama-3.2-1B heads (32 query / 8 kv heads of 64), bf16, batch 1, one layer alone (benchmarks/fused_micro.py,
# 2026-12-02 ninth session, benchmarks/results/fused_micro_h200.json "attention"), against compiled SDPA (cuDNN) over
# the whole cache: a 384-position cache with 144 / 272 in use 4.66 / 5.76 us (one split, blocks of 128, tensor
# cores) vs 5.92 / 6.12; 2,048 positions with 1,024 in use 9.02 us (8 splits of 64) vs 7.93, so cuDNN, reading
# twice the bytes, still wins on long caches: each of this kernel's loop steps costs ~1.2 us of latency. Without
# tensor cores the same cases took 8.1 / 12.0 / 13.2 us at best (the 3-D broadcast products compile to ~400 warp
# shuffles per step), and one split without them 22.5-139 us. Earlier (no extent, the mask converted per layer):
# 9 us per layer in the decode step against cuDNN's 5.8 (decode_variants_h200.json run11), tensor-core products
# with 16 splits 3.0 + 4.6 us for the combining pass, 1.170 ms per step vs 1.047 with cuDNN SDPA (run12). Combining
# in the same launch instead (the last split to finish, counting in persistent int32 zeros the static cache owned;
# thirteenth session, commit 1e4ad6f) took 6.31 / 6.87 us at best for the two 384-position cases against cuDNN's
# 5.91 / 6.29, and 973 vs 1,008 tok/s in the step (fused_micro_h200.json "attention_one_launch",
# decode_variants_h200.json run33): the atomic and the combining program's reads cost what the launch did. So
# `flash_decode` stays opt-in and `sdpa` the default.


def launch_tag() -> str:
    """The launch settings in force, for the decode step's compile cache key (see qkv_rope.launch_tag)."""
    return f"{_SPLITS}-{_BLOCK}-{_WARPS}-{_DOT}"


def reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    allowed: torch.Tensor,
    scale: float,
    extent: torch.Tensor | None = None,
) -> torch.Tensor:
    """q (B, H, 1, D); k, v (B, Hkv, L, D) with H a multiple of Hkv; allowed (B, L) bool; extent (B,) integers or
    None: row b attends only to allowed positions below extent[b]. Softmax in fp32."""
    b, h, _, d = q.shape
    hk, length = k.size(1), k.size(2)
    if extent is not None:
        allowed = allowed & (torch.arange(length, device=allowed.device)[None, :] < extent.reshape(b, 1))
    qg = q.reshape(b, hk, h // hk, d).float()
    scores = torch.einsum("bgrd,bgld->bgrl", qg, k.float()) * scale
    scores = scores.masked_fill(~allowed.reshape(b, 1, 1, length), float("-inf"))
    out = torch.einsum("bgrl,bgld->bgrd", torch.softmax(scores, dim=-1), v.float())
    return out.reshape(b, h, 1, d).to(q.dtype)


def supported(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Shapes the Triton kernel takes: one query, a power-of-two head size up to 256, unit stride along it."""
    return (
        q.dim() == 4
        and q.size(2) == 1
        and head_size_supported(q.size(-1))
        and q.size(1) % k.size(1) == 0
        and q.stride(-1) == 1
        and k.stride(-1) == 1
    )


def head_size_supported(d: int) -> bool:
    """A power-of-two head size of 16-256: what the attention kernels' ranges over it and their products take."""
    return d & (d - 1) == 0 and 16 <= d <= 256


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def query_rows(rep: int, dot: bool) -> int:
    """Rows the attention kernels hold a key/value head's `rep` query heads in: a power of two, and at least 16 for
    tensor-core products."""
    return max(16, _pow2(rep)) if dot else _pow2(rep)


def plan(
    batch: int, kv_heads: int, length: int, block: int = 64, programs: int = 128, splits: int | None = None
) -> int:
    """Splits of a cache of `length` positions: unless `splits` is given, enough that batch x kv_heads x splits
    programs fill the GPU, but no more splits than blocks and none of fewer than `_MIN_SPLIT` positions; a power of
    two, as the combining pass indexes splits with tl.arange (a split left without positions weighs nothing
    there). The kernel itself shares the positions in use over them (`_chunk`)."""
    blocks = max(1, -(-length // block))
    if splits is None:
        fill = _pow2(max(1, -(-programs // (batch * kv_heads))))
        splits = min(fill, 1 << (blocks.bit_length() - 1), 1 << (max(1, length // _MIN_SPLIT).bit_length() - 1))
    return splits


def _chunk(n: int, splits: int, block: int) -> int:
    """Positions per split: n shared over the splits, rounded up to whole blocks (the partial kernel's formula,
    written out here for the tests)."""
    per_split = -(-n // splits)
    return -(-per_split // block) * block


@functools.cache
def _kernels() -> tuple[Any, Any]:
    from llamaforge.kernels.fused_triton import decode_attention_combine_kernel, decode_attention_kernel

    return decode_attention_kernel, decode_attention_combine_kernel


def launch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    allowed: torch.Tensor,
    scale: float,
    extent: torch.Tensor | None = None,
    *,
    splits: int | None = None,
    block: int | None = None,
    warps: int | None = None,
    dot: bool | None = None,
    wrap: Any = None,
) -> torch.Tensor:
    """Run the Triton kernels (on CUDA, or on CPU tensors under TRITON_INTERPRET=1). `wrap` is
    torch.library.wrap_triton inside the custom op, so torch.compile can trace the launches. Settings left None
    come from the module's (`_SPLITS` None: plan()); `dot` applies to 16-bit inputs only (fp32 would run on TF32)."""
    partial_kernel, combine_kernel = _kernels()
    if wrap is not None:
        partial_kernel, combine_kernel = wrap(partial_kernel), wrap(combine_kernel)
    b, h, _, d = q.shape
    hk, length = k.size(1), k.size(2)
    rep = h // hk
    dot = (_DOT if dot is None else dot) and q.dtype in (torch.float16, torch.bfloat16) and k.dtype == q.dtype
    rep_p = query_rows(rep, dot)
    splits = plan(b, hk, length, 64 if dot else 32, splits=splits if splits is not None else _SPLITS)
    block = block or _BLOCK or ((128 if splits == 1 else 64) if dot else 32)
    if dot:
        block = max(block, 16)
    out = torch.empty(b, h, 1, d, dtype=q.dtype, device=q.device)
    # bytes for the kernel: inside the compiled step the mask is computed there and the conversion fuses into the
    # kernel that computes it (a dtype view of it, free in eager mode, fails to lower in inductor of torch 2.11)
    ok = allowed.reshape(b, length).to(torch.uint8)  # no copy when the mask is already bytes
    ext = extent.reshape(b) if extent is not None else ok  # unread without an extent
    m_buf = l_buf = acc_buf = out  # one split writes the output directly: no partial statistics to hold
    if splits > 1:
        n = b * hk * splits * rep_p
        stats = torch.empty(n * (2 + d), dtype=torch.float32, device=q.device)
        m_buf, l_buf, acc_buf = stats[:n], stats[n : 2 * n], stats[2 * n :]
    partial_kernel[(b * hk, splits)](
        q, k, v, ok, ext, m_buf, l_buf, acc_buf, out,
        scale, length,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        ok.stride(0), out.stride(0), out.stride(1),
        KV_HEADS=hk, REP=rep, REP_P=rep_p, D=d, BLOCK=block, SPLITS=splits, EXTENT=extent is not None, DOT=dot,
        num_warps=warps or _WARPS,
    )  # fmt: skip
    if splits > 1:
        combine_kernel[(b * hk,)](
            m_buf, l_buf, acc_buf, out, out.stride(0), out.stride(1),
            KV_HEADS=hk, REP=rep, REP_P=rep_p, D=d, SPLITS=splits,
        )  # fmt: skip
    return out


if hasattr(torch.library, "triton_op"):  # torch >= 2.6

    @torch.library.triton_op("llamaforge::decode_attention", mutates_args=())
    def decode_attention(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        allowed: torch.Tensor,
        scale: float,
        extent: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attention of one query per row over the cache; `allowed` (B, L) marks what it may see, `extent` (B,),
        when given, bounds it (and the work) to the positions below it."""
        return launch(q, k, v, allowed, scale, extent, wrap=torch.library.wrap_triton)

    @decode_attention.register_kernel("cpu")
    def _decode_attention_cpu(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        allowed: torch.Tensor,
        scale: float,
        extent: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return reference(q, k, v, allowed, scale, extent)

else:  # older torch: no way to trace Triton launches into a compiled graph, so no kernel route

    def decode_attention(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        allowed: torch.Tensor,
        scale: float,
        extent: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return reference(q, k, v, allowed, scale, extent)


def available(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether a call would run the Triton kernel: CUDA tensors, Triton installed, torch with triton_op."""
    return q.is_cuda and TRITON_OPS and supported(q, k)


def default_scale(q: torch.Tensor) -> float:
    return 1.0 / math.sqrt(q.size(-1))
