"""One-query attention over a static KV cache (flash-decoding), for the decode step on CUDA.

Why a kernel of our own: in the compiled decode step of a Llama-3.2-1B shape at batch 1 on an H200, cuDNN's
attention took 5.7 us per layer plus ~1 us to turn the boolean mask into its additive form, for ~1 MB of keys and
values per layer. Here the grouped query heads that share a key/value head are handled by one program, so keys
and values are read once per group, not once per query head; the cache length is split over programs
(partial softmax statistics, then one combining pass) so a single sequence still spreads over the whole GPU; and
the mask is read as booleans in place.

`decode_attention(q, k, v, allowed, scale)` is a custom op (`torch.ops.llamaforge.decode_attention`) that
torch.compile traces into the compiled step on CUDA (Triton through `torch.library.triton_op`) and that runs the
PyTorch reference elsewhere.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch

from llamaforge.kernels import TRITON_OPS

# Launch settings, module-level so a same-run A/B on the GPU can change them (benchmarks/decode_variants.py): a
# fixed number of cache-length splits instead of plan()'s, positions per loop step, warps per program.
_SPLITS: int | None = None
_BLOCK = 32
_WARPS = 4
# Tried and timed slower on the H200, so gone: the block products on tensor cores (tl.dot, the query group padded
# to 16 rows): 1.170 ms per 1B decode step vs 1.047 with cuDNN SDPA (benchmarks/results/decode_variants_h200.json
# run12).


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor, scale: float) -> torch.Tensor:
    """q (B, H, 1, D); k, v (B, Hkv, L, D) with H a multiple of Hkv; allowed (B, L) bool. Softmax in fp32."""
    b, h, _, d = q.shape
    hk, length = k.size(1), k.size(2)
    qg = q.reshape(b, hk, h // hk, d).float()
    scores = torch.einsum("bgrd,bgld->bgrl", qg, k.float()) * scale
    scores = scores.masked_fill(~allowed.reshape(b, 1, 1, length), float("-inf"))
    out = torch.einsum("bgrl,bgld->bgrd", torch.softmax(scores, dim=-1), v.float())
    return out.reshape(b, h, 1, d).to(q.dtype)


def supported(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Shapes the Triton kernel takes: one query, a power-of-two head size up to 256, unit stride along it."""
    d = q.size(-1)
    return (
        q.dim() == 4
        and q.size(2) == 1
        and d & (d - 1) == 0
        and 16 <= d <= 256
        and q.size(1) % k.size(1) == 0
        and q.stride(-1) == 1
        and k.stride(-1) == 1
    )


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def plan(
    batch: int, kv_heads: int, length: int, block: int = 32, programs: int = 128, splits: int | None = None
) -> tuple[int, int]:
    """(splits, chunk): unless `splits` is given, enough splits of the cache length that batch x kv_heads x splits
    programs fill the GPU, and no more splits than blocks; a power of two, as the combining pass indexes splits
    with tl.arange (a split left without positions by the rounding weighs nothing there). Each chunk is a whole
    number of blocks."""
    blocks = max(1, -(-length // block))
    if splits is None:
        splits = min(_pow2(max(1, -(-programs // (batch * kv_heads)))), 1 << (blocks.bit_length() - 1))
    chunk = -(-length // splits)
    chunk = -(-chunk // block) * block
    return splits, chunk


@functools.cache
def _kernels() -> tuple[Any, Any]:
    import triton
    import triton.language as tl

    @triton.jit
    def partial_kernel(
        q_ptr, k_ptr, v_ptr, ok_ptr, m_ptr, l_ptr, acc_ptr, o_ptr,
        scale, length, chunk,
        sq_b, sq_h, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l, sok_b, so_b, so_h,
        KV_HEADS: tl.constexpr, REP: tl.constexpr, REP_P: tl.constexpr, D: tl.constexpr,
        BLOCK: tl.constexpr, SPLITS: tl.constexpr,
    ):  # fmt: skip
        pid = tl.program_id(0)  # batch row x kv head
        split = tl.program_id(1)
        b = pid // KV_HEADS
        g = pid % KV_HEADS
        r = tl.arange(0, REP_P)
        d = tl.arange(0, D)
        heads = g * REP + r
        q = tl.load(q_ptr + b * sq_b + heads[:, None] * sq_h + d[None, :], mask=(r < REP)[:, None], other=0.0)
        q = (q.to(tl.float32) * scale).to(tl.float32)  # scale may arrive as fp64 (inductor): keep fp32
        m_i = tl.full((REP_P,), float("-inf"), tl.float32)
        l_i = tl.zeros((REP_P,), tl.float32)
        acc = tl.zeros((REP_P, D), tl.float32)
        start = split * chunk
        end = tl.minimum(start + chunk, length)
        for l0 in range(start, end, BLOCK):
            offs = l0 + tl.arange(0, BLOCK)
            inside = offs < end
            ok = tl.load(ok_ptr + b * sok_b + offs, mask=inside, other=0) != 0
            rows = offs[:, None]
            kt = tl.load(k_ptr + b * sk_b + g * sk_h + rows * sk_l + d[None, :], mask=inside[:, None], other=0.0)
            s = tl.sum(q[:, None, :] * kt.to(tl.float32)[None, :, :], axis=2)  # (REP_P, BLOCK)
            s = tl.where(ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing allowed yet: keep the sums at zero
            alpha = tl.exp(m_i - m_use)
            p = tl.exp(s - m_use[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            vt = tl.load(v_ptr + b * sv_b + g * sv_h + rows * sv_l + d[None, :], mask=inside[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * vt.to(tl.float32)[None, :, :], axis=1)
            m_i = m_new
        if SPLITS == 1:  # the whole length in one program: normalise and write the output directly
            out = acc / l_i[:, None]
            dst = o_ptr + b * so_b + heads[:, None] * so_h + d[None, :]
            tl.store(dst, out.to(o_ptr.dtype.element_ty), mask=(r < REP)[:, None])
        else:
            row = (pid * SPLITS + split) * REP_P + r
            tl.store(m_ptr + row, m_i)
            tl.store(l_ptr + row, l_i)
            tl.store(acc_ptr + row[:, None] * D + d[None, :], acc)

    @triton.jit
    def combine_kernel(
        m_ptr, l_ptr, acc_ptr, o_ptr, so_b, so_h,
        KV_HEADS: tl.constexpr, REP: tl.constexpr, REP_P: tl.constexpr, D: tl.constexpr, SPLITS: tl.constexpr,
    ):  # fmt: skip
        pid = tl.program_id(0)
        b = pid // KV_HEADS
        g = pid % KV_HEADS
        s = tl.arange(0, SPLITS)
        r = tl.arange(0, REP_P)
        d = tl.arange(0, D)
        row = (pid * SPLITS + s)[:, None] * REP_P + r[None, :]  # (SPLITS, REP_P)
        m = tl.load(m_ptr + row)
        top = tl.max(m, axis=0)
        top = tl.where(top == float("-inf"), 0.0, top)
        w = tl.exp(m - top[None, :])  # a split that allowed nothing weighs 0
        total = tl.sum(tl.load(l_ptr + row) * w, axis=0)
        acc = tl.load(acc_ptr + row[:, :, None] * D + d[None, None, :])  # (SPLITS, REP_P, D)
        out = tl.sum(acc * w[:, :, None], axis=0) / total[:, None]
        heads = g * REP + r
        dst = o_ptr + b * so_b + heads[:, None] * so_h + d[None, :]
        tl.store(dst, out.to(o_ptr.dtype.element_ty), mask=(r < REP)[:, None])

    return partial_kernel, combine_kernel


def launch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    allowed: torch.Tensor,
    scale: float,
    *,
    splits: int | None = None,
    block: int | None = None,
    wrap: Any = None,
) -> torch.Tensor:
    """Run the Triton kernels (on CUDA, or on CPU tensors under TRITON_INTERPRET=1). `wrap` is
    torch.library.wrap_triton inside the custom op, so torch.compile can trace the launches."""
    partial_kernel, combine_kernel = _kernels()
    if wrap is not None:
        partial_kernel, combine_kernel = wrap(partial_kernel), wrap(combine_kernel)
    b, h, _, d = q.shape
    hk, length = k.size(1), k.size(2)
    rep = h // hk
    rep_p = _pow2(rep)
    block = block or _BLOCK
    splits, chunk = plan(b, hk, length, block, splits=splits if splits is not None else _SPLITS)
    out = torch.empty(b, h, 1, d, dtype=q.dtype, device=q.device)
    ok = allowed.reshape(b, length).to(torch.uint8)
    m_buf = l_buf = acc_buf = out  # one split writes the output directly: no partial statistics to hold
    if splits > 1:
        n = b * hk * splits * rep_p
        stats = torch.empty(n * (2 + d), dtype=torch.float32, device=q.device)
        m_buf, l_buf, acc_buf = stats[:n], stats[n : 2 * n], stats[2 * n :]
    partial_kernel[(b * hk, splits)](
        q, k, v, ok, m_buf, l_buf, acc_buf, out,
        scale, length, chunk,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        ok.stride(0), out.stride(0), out.stride(1),
        KV_HEADS=hk, REP=rep, REP_P=rep_p, D=d, BLOCK=block, SPLITS=splits, num_warps=_WARPS,
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
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """Attention of one query per row over the whole cache; `allowed` (B, L) marks what it may see."""
        return launch(q, k, v, allowed, scale, wrap=torch.library.wrap_triton)

    @decode_attention.register_kernel("cpu")
    def _decode_attention_cpu(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor, scale: float
    ) -> torch.Tensor:
        return reference(q, k, v, allowed, scale)

else:  # older torch: no way to trace Triton launches into a compiled graph, so no kernel route

    def decode_attention(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor, scale: float
    ) -> torch.Tensor:
        return reference(q, k, v, allowed, scale)


def available(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether a call would run the Triton kernel: CUDA tensors, Triton installed, torch with triton_op."""
    return q.is_cuda and TRITON_OPS and supported(q, k)


def default_scale(q: torch.Tensor) -> float:
    return 1.0 / math.sqrt(q.size(-1))
