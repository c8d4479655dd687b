"""One decoding step's q/k/v products, RoPE and KV-cache write for one layer, in one launch (batch 1).

Why: in the compiled batch-1 decode step on an H200 (Llama-3.2-1B shape, bf16; 2026-12-02 run18) each layer runs the
stacked q/k/v reduction (5.5 us) and then three small kernels that only move a few kilobytes: RoPE on q (1.3 us),
RoPE on k plus its cache write (1.2 us) and the v cache write (0.9 us). The step's kernels run back to back, so each
small kernel costs about its own launch-to-finish latency; ~55 us of a ~1,000 us step is spent on them. Here every
program reduces a few pairs of weight rows (row d and row d + head_dim/2 of one head, the two halves RoPE mixes),
applies the rotation to its pairs and writes them where they go: q to the op's output, k and v straight into the
cache at the step's position. The switch that routes the attention module here is
`llamaforge.plugins.attention._FUSED_QKV_ROPE` (on CUDA by default: 0.961 vs 1.033 ms per H200 step, 2026-12-02).

Arithmetic, as the compiled decode step does it: fp32 sums over the row, rounded to the weights' dtype (the linear's
output), RoPE in fp32 from that and the cos/sin rows (already in the model's dtype), one rounding at the store. A
folded RMSNorm is applied as llamaforge's RMSNorm rounds it, except in the one-pass form (`_ONE_PASS`, the default):
there the sums take x times the norm's weight and are scaled by 1/rms at the end, without rounding the normalised
row (the same values to within the dtype's rounding). `reference` is the unfused arithmetic in PyTorch; the op runs
it on CPUs, and the tests compare the kernel against it in Triton's CPU interpreter.

`qkv_rope_attention` does the step's one-query attention in the same launch: programs are numbered by key/value head,
and the last of a group's programs to finish (counted with an acquire-release atomic in int32 zeros that the static
cache owns) attends for the group's query heads, so the attention is not a launch of its own and early groups attend
while later ones still stream weights. On an H200 (1B shape, bf16, 2026-12-03) that took the step from 1.011 / 0.996
to 0.915 / 0.932 ms; `llamaforge.plugins.attention._FUSED_ATTENTION` routes to it.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from llamaforge.kernels import operands_supported, pack_extras, rms_row, row_products, unpack_extras

# Launch settings (module-level for same-run A/Bs): row pairs per program (a power of two dividing head_dim / 2),
# values per row per loop step, warps per program. 4 pairs give the 1B shape 48 heads x 8 = 384 programs.
_PAIRS = 4
_BLOCK_K = 1024
_WARPS = 4
# With a folded norm: gather the row's statistics in the products' loop and scale the sums by 1/rms at the end (one
# pass over x, no rounding of the normalised row: within bf16 tolerance of the reference, not bit-equal to it)
# instead of a statistics loop before the products in every program. H200, 1B shape, alone
# (benchmarks/fused_micro.py, 2026-12-02): bf16 6.18 vs 7.23 us per call, int8 5.65 vs 5.59 (a tie); in the decode
# step 94.7 vs 117-118 us per step for the 16 layers
_ONE_PASS = True
# With the attention folded in (`qkv_rope_attention`): cache positions per step of the attending program's loop.
# H200, 1B shape, bf16, alone (benchmarks/fused_micro.py --kernels qkv_attn, 2026-12-03): 64 was the fastest of six
# settings (32-256 positions, 4 or 8 warps) for a 384-position cache with 144 and 272 in use
_BLOCK_L = 64

# (allowed (1, L) bool or bytes, extent (1,), int32 zeros of at least Hkv entries, softmax scale)
Attend = tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]


def launch_tag() -> str:
    """The launch settings in force, for the decode step's compile cache key: the Triton op reads them when
    torch.compile traces it, and inductor's on-disk cache does not key on them (an H200 run replayed the default
    kernel for five variants with other settings, 2026-12-02 run20)."""
    return f"qkv_rope-{_PAIRS}-{_BLOCK_K}-{_WARPS}-{_ONE_PASS}-{_BLOCK_L}"


def _rotate(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_dim: int) -> torch.Tensor:
    """RoPE (rotate-half layout, sign folded into `sin`) on fp32 rows laid out head after head."""
    heads = t.view(-1, head_dim)
    half = head_dim // 2
    swapped = torch.cat((heads[:, half:], heads[:, :half]), dim=-1)
    return (heads * cos.float() + swapped * sin.float()).view(t.shape)


def reference(
    x: torch.Tensor,
    wq: torch.Tensor,
    wk: torch.Tensor,
    wv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_position: torch.Tensor,
    scales: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    norm: tuple[torch.Tensor, float] | None = None,
) -> torch.Tensor:
    """x (1, K); wq (Hq*D, K), wk/wv (Hkv*D, K); cos/sin (D,) (sin with rotate-half's sign folded in); caches
    (1, Hkv, L, D); cache_position (1,); for int8 weight-only weights their per-row scales (in x's dtype); `norm`:
    (weight, eps) of an RMSNorm to apply to x first (as llamaforge's RMSNorm: fp32 statistics, the normalised row
    rounded to x's dtype, then times the weight). Writes k and v at the position; returns q (1, Hq*D) after RoPE."""
    dtype, head_dim = x.dtype, cos.shape[-1]
    q, k, v = row_products(rms_row(x, norm), (wq, wk, wv), scales, dtype)
    q, k = _rotate(q, cos, sin, head_dim), _rotate(k, cos, sin, head_dim)
    n_kv = k_cache.shape[1]
    k_cache[0, :, cache_position] = k.view(n_kv, 1, head_dim).to(k_cache.dtype)
    v_cache[0, :, cache_position] = v.view(n_kv, 1, head_dim).to(v_cache.dtype)
    return q.to(dtype)


def supported(
    x: torch.Tensor,
    weights: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    scales: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    norm: tuple[torch.Tensor, float] | None = None,
) -> bool:
    """Shapes and layouts the kernel takes (tensor metadata only: this runs inside the traced decode step): weights
    in x's dtype, or int8 with per-row scales in x's dtype; a folded norm's weight in x's dtype, one per column."""
    head_dim = cos.shape[-1]
    dtype = x.dtype
    return (
        operands_supported(x, weights, scales, norm)
        and head_dim % (2 * _PAIRS) == 0
        and cos.numel() == head_dim == sin.numel()
        and cos.is_contiguous()
        and sin.is_contiguous()
        and all(t.dtype == dtype for t in (cos, sin, k_cache, v_cache))
        and all(w.size(0) % head_dim == 0 for w in weights)
        and weights[1].shape == weights[2].shape
        and all(
            c.dim() == 4 and c.size(0) == 1 and c.size(-1) == head_dim and c.stride(-1) == 1 for c in (k_cache, v_cache)
        )
        and k_cache.size(1) * head_dim == weights[1].size(0)
        and v_cache.shape[1:3] == k_cache.shape[1:3]
    )


@functools.cache
def _kernel() -> Any:
    from llamaforge.kernels.fused_triton import qkv_rope_kernel

    return qkv_rope_kernel


def launch(
    x: torch.Tensor,
    wq: torch.Tensor,
    wk: torch.Tensor,
    wv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_position: torch.Tensor,
    scales: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    norm: tuple[torch.Tensor, float] | None = None,
    *,
    pairs: int | None = None,
    block_k: int | None = None,
    warps: int | None = None,
    one_pass: bool | None = None,
    attend: Attend | None = None,
    block_l: int | None = None,
    wrap: Any = None,
) -> torch.Tensor:
    """Run the Triton kernel (on CUDA, or on CPU tensors under TRITON_INTERPRET=1); `wrap` is
    torch.library.wrap_triton inside the custom op, so torch.compile can trace the launch. Returns q (1, Hq*D), or
    with `attend` the attention output (1, Hq*D) (see `qkv_rope_attention`)."""
    import triton

    from llamaforge.kernels import decode_attention

    kernel = _kernel()
    if wrap is not None:
        kernel = wrap(kernel)
    head_dim = int(cos.shape[-1])
    half = head_dim // 2
    pairs = pairs or _PAIRS
    k_len = int(x.size(1))
    block_k = min(block_k or _BLOCK_K, triton.next_power_of_2(k_len))
    per_head = half // pairs
    heads = [int(w.size(0)) // head_dim for w in (wq, wk, wv)]
    progs = [h * per_head for h in heads]
    q = torch.empty(1, int(wq.size(0)), dtype=x.dtype, device=x.device)
    sq, sk, sv = scales if scales is not None else (x, x, x)  # unread without INT8
    g, eps = norm if norm is not None else (x, 0.0)  # unread without NORM
    out, ok, extent, sync, scale, rep, rep_p, dot = q, q, q, q, 0.0, 1, 1, False  # unread without ATTN
    if attend is not None:
        allowed, extent, sync, scale = attend
        out = torch.empty_like(q)
        # bytes for the kernel; inside the compiled step the conversion fuses into the kernel computing the mask
        ok = allowed.reshape(1, -1).to(torch.uint8)
        rep = heads[0] // heads[1]
        dot = x.dtype in (torch.float16, torch.bfloat16)  # fp32 would run its products on TF32
        rep_p = decode_attention.query_rows(rep, dot)
    kernel[(sum(progs),)](
        x, wq, wk, wv, sq, sk, sv, cos, sin, q, k_cache, v_cache, cache_position, g, float(eps),
        k_len, wq.stride(0), wk.stride(0), wv.stride(0), progs[0], progs[0] + progs[1],
        k_cache.stride(1), k_cache.stride(2), v_cache.stride(1), v_cache.stride(2), k_cache.size(2),
        ok, extent, out, sync, float(scale),
        HALF=half, PAIRS=pairs, BLOCK_K=block_k, INT8=scales is not None,
        NORM=norm is not None, ONE_PASS=norm is not None and (_ONE_PASS if one_pass is None else one_pass),
        ATTN=attend is not None, REP=rep, REP_P=rep_p, BLOCK_L=block_l or _BLOCK_L, DOT=dot,
        num_warps=warps or _WARPS,
    )  # fmt: skip
    return out


@torch.library.custom_op("llamaforge::qkv_rope_cache_reference", mutates_args={"k_cache", "v_cache"})
def _reference_op(
    x: torch.Tensor,
    wq: torch.Tensor,
    wk: torch.Tensor,
    wv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_position: torch.Tensor,
    scales: list[torch.Tensor],
    norm_weight: list[torch.Tensor],
    eps: float,
) -> torch.Tensor:
    """The PyTorch reference as an opaque op: compiled graphs off CUDA keep it whole, as they keep the kernel on CUDA
    (tracing the Triton op's body needs a GPU driver, even to analyse which arguments the kernel writes)."""
    return reference(
        x, wq, wk, wv, cos, sin, k_cache, v_cache, cache_position, *unpack_extras(scales, norm_weight, eps)
    )


@_reference_op.register_fake
def _(x, wq, wk, wv, cos, sin, k_cache, v_cache, cache_position, scales, norm_weight, eps):
    return x.new_empty(1, wq.size(0))


if hasattr(torch.library, "triton_op"):  # torch >= 2.6

    @torch.library.triton_op("llamaforge::qkv_rope_cache", mutates_args={"k_cache", "v_cache"})
    def _triton_op(
        x: torch.Tensor,
        wq: torch.Tensor,
        wk: torch.Tensor,
        wv: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        cache_position: torch.Tensor,
        scales: list[torch.Tensor],
        norm_weight: list[torch.Tensor],
        eps: float,
    ) -> torch.Tensor:
        return launch(x, wq, wk, wv, cos, sin, k_cache, v_cache, cache_position,
                      *unpack_extras(scales, norm_weight, eps), wrap=torch.library.wrap_triton)  # fmt: skip

else:  # older torch: no way to trace Triton launches into a compiled graph
    _triton_op = None


def qkv_rope_cache(
    x: torch.Tensor,
    wq: torch.Tensor,
    wk: torch.Tensor,
    wv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_position: torch.Tensor,
    scales: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    norm: tuple[torch.Tensor, float] | None = None,
) -> torch.Tensor:
    """q/k/v of one row, RoPE, k and v written into the caches at cache_position; returns q (1, Hq*D) after RoPE.
    The Triton kernel on CUDA (as a custom op torch.compile traces), the reference elsewhere. `scales`: the per-row
    scales of int8 weight-only weights; `norm`: an RMSNorm's (weight, eps) to apply to x first."""
    op = _triton_op if x.device.type == "cuda" and _triton_op is not None else _reference_op
    return op(x, wq, wk, wv, cos, sin, k_cache, v_cache, cache_position, *pack_extras(scales, norm))


# ----- with the attention folded in --------------------------------------------------------------------------------
def attention_reference(
    x: torch.Tensor,
    wq: torch.Tensor,
    wk: torch.Tensor,
    wv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_position: torch.Tensor,
    allowed: torch.Tensor,
    extent: torch.Tensor,
    scale: float,
    scales: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    norm: tuple[torch.Tensor, float] | None = None,
) -> torch.Tensor:
    """`reference`, then one-query attention of q over the caches (llamaforge.kernels.decode_attention's reference:
    fp32 softmax over the allowed positions below the extent); returns the attention output (1, Hq*D)."""
    from llamaforge.kernels import decode_attention

    q = reference(x, wq, wk, wv, cos, sin, k_cache, v_cache, cache_position, scales, norm)
    head_dim, length = cos.shape[-1], k_cache.size(2)
    q = q.view(1, -1, 1, head_dim)
    out = decode_attention.reference(q, k_cache, v_cache, allowed.reshape(1, length).bool(), scale, extent.reshape(1))
    return out.reshape(1, -1)


def attention_supported(
    x: torch.Tensor,
    weights: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    cos: torch.Tensor,
    k_cache: torch.Tensor,
    allowed: torch.Tensor,
    extent: torch.Tensor,
    sync: torch.Tensor,
) -> bool:
    """What the attention folded into the kernel takes beyond `supported`: a power-of-two head size of 16-256, whole
    groups of query heads per key/value head, a one-row mask over the cache, a one-entry extent, a counter per key/
    value head."""
    from llamaforge.kernels import decode_attention

    length = k_cache.size(2)
    return (
        decode_attention.head_size_supported(cos.shape[-1])
        and weights[0].size(0) % weights[1].size(0) == 0
        and allowed.numel() == length
        and allowed.dtype in (torch.bool, torch.uint8)
        and allowed.is_contiguous()
        and extent.numel() == 1
        and not extent.is_floating_point()
        and sync.dtype == torch.int32
        and sync.dim() == 1
        and sync.numel() >= k_cache.size(1)
    )


@torch.library.custom_op("llamaforge::qkv_rope_attention_reference", mutates_args={"k_cache", "v_cache", "sync"})
def _attention_reference_op(
    x: torch.Tensor,
    wq: torch.Tensor,
    wk: torch.Tensor,
    wv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_position: torch.Tensor,
    allowed: torch.Tensor,
    extent: torch.Tensor,
    sync: torch.Tensor,
    scale: float,
    scales: list[torch.Tensor],
    norm_weight: list[torch.Tensor],
    eps: float,
) -> torch.Tensor:
    """The reference as an opaque op (see `_reference_op`); `sync` is the kernel's and is left alone here."""
    return attention_reference(x, wq, wk, wv, cos, sin, k_cache, v_cache, cache_position, allowed, extent, scale,
                               *unpack_extras(scales, norm_weight, eps))  # fmt: skip


@_attention_reference_op.register_fake
def _(x, wq, wk, wv, cos, sin, k_cache, v_cache, cache_position, allowed, extent, sync, scale, scales, norm_weight,
      eps):  # fmt: skip
    return x.new_empty(1, wq.size(0))


if hasattr(torch.library, "triton_op"):  # torch >= 2.6

    @torch.library.triton_op("llamaforge::qkv_rope_attention", mutates_args={"k_cache", "v_cache", "sync"})
    def _attention_triton_op(
        x: torch.Tensor,
        wq: torch.Tensor,
        wk: torch.Tensor,
        wv: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        cache_position: torch.Tensor,
        allowed: torch.Tensor,
        extent: torch.Tensor,
        sync: torch.Tensor,
        scale: float,
        scales: list[torch.Tensor],
        norm_weight: list[torch.Tensor],
        eps: float,
    ) -> torch.Tensor:
        return launch(x, wq, wk, wv, cos, sin, k_cache, v_cache, cache_position,
                      *unpack_extras(scales, norm_weight, eps), attend=(allowed, extent, sync, scale),
                      wrap=torch.library.wrap_triton)  # fmt: skip

else:
    _attention_triton_op = None


def qkv_rope_attention(
    x: torch.Tensor,
    wq: torch.Tensor,
    wk: torch.Tensor,
    wv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_position: torch.Tensor,
    allowed: torch.Tensor,
    extent: torch.Tensor,
    sync: torch.Tensor,
    scale: float,
    scales: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    norm: tuple[torch.Tensor, float] | None = None,
) -> torch.Tensor:
    """`qkv_rope_cache` and the step's attention in one launch: the last program of each key/value head's group to
    finish (counted in `sync`, int32 zeros that persist across calls, left at zero) attends for the group's query
    heads over the cache positions below `extent` that `allowed` (1, L) permits. Returns the attention output
    (1, Hq*D), ready for o_proj. Why: one-query attention is a separate ~6 us launch per layer on an H200 for a few
    hundred kilobytes of keys and values; here it runs at the end of a launch that was already running, and the
    groups that finish early attend while the others still stream their weights."""
    op = _attention_triton_op if x.device.type == "cuda" and _attention_triton_op is not None else (
        _attention_reference_op)  # fmt: skip
    return op(x, wq, wk, wv, cos, sin, k_cache, v_cache, cache_position, allowed, extent, sync, float(scale),
              *pack_extras(scales, norm))  # fmt: skip
