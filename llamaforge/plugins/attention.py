"""rope_attention (MHA / GQA / MQA through n_kv_heads) and the attention kernels `sdpa` and `eager`.

The module owns q/k/v/o projections under Hugging Face names; the arithmetic is a registered kernel function, so
choosing `eager` for debugging or `sdpa` for speed never changes a state-dict key.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from llamaforge.core.interfaces import Attention, AttentionKernel, AttentionMask, KVCache, PositionEmbedding
from llamaforge.registry import hookimpl

# Batch-1 decoding steps route q/k/v, RoPE and the cache write through one kernel (llamaforge.kernels.qkv_rope):
# True on any device (CPUs run the op's PyTorch reference: the tests), None on CUDA only (the default), False never.
# H200, Llama-3.2-1B shape, bf16, batch 1, 256 tokens (2026-12-02, benchmarks/results/decode_variants_h200.json run19):
# 0.961 ms per step vs 1.033 unfused, 1,024 vs 955 tok/s end to end (122 kernels per step instead of 181).
_FUSED_QKV_ROPE: bool | None = None
# With that route: the block's input RMSNorm folded into the same kernel (each program normalises the row itself),
# which saves the norm's own kernel per layer.
_FOLD_NORM = True
# With that route: the step's attention folded into the same launch (llamaforge.kernels.qkv_rope.qkv_rope_attention;
# the last program of each key/value head's group attends for it) when the module's kernel is `sdpa` or
# `flash_decode` and the static cache holds at most _ATTEND_MAX_LENGTH positions. True: any device; None: CUDA only
# (the default); False: never. H200, 1B shape, bf16, batch 1, 16 + 256 tokens (a 384-position cache), fresh
# processes of one run (2026-12-03, decode_variants_h200.json run36): 1,074.5 / 1,056.1 tok/s end to end against
# 976.3 / 989.7 without it; the q/k/v kernel with the attention 151 us per step against 96 + 96 us for it and cuDNN.
# The bound is the longest cache it was measured to win on: one program per group walks the positions in use
# (~1.1 us per 64 of them, timed alone), so on long caches cuDNN's separate kernel wins (one layer alone with 900 of
# 1,024 positions in use: 24.3 vs 14.1 us). Static caches come in multiples of 128 positions.
_FUSED_ATTENTION: bool | None = None
_ATTEND_MAX_LENGTH = 384


class RopeAttention(Attention):
    """Causal self-attention with separate q/k/v projections and grouped key/value heads."""

    accepts_prenorm = True  # the block's input norm can be folded into the fused decode kernel
    accepts_residual = True  # the block's residual addition can be done in o_proj's decode kernel

    def __init__(
        self,
        *,
        dim: int,
        n_heads: int,
        n_kv_heads: int,
        head_dim: int,
        layer_idx: int,
        bias: bool,
        dropout: float,
        kernel: AttentionKernel,
    ) -> None:
        super().__init__()
        if n_heads % n_kv_heads:
            raise ValueError(f"n_kv_heads ({n_kv_heads}) must divide n_heads ({n_heads})")
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.layer_idx = layer_idx
        self.dropout = dropout
        self.kernel = kernel
        self.q_proj = nn.Linear(dim, n_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(dim, n_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(dim, n_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(n_heads * head_dim, dim, bias=bias)

    def forward(
        self,
        x: torch.Tensor,
        *,
        positions: PositionEmbedding,
        position_state: Any,
        mask: AttentionMask,
        cache: KVCache | None = None,
        cache_position: torch.Tensor | None = None,
        prenorm: nn.Module | None = None,
        residual: torch.Tensor | None = None,
    ) -> torch.Tensor:
        bsz, seq, _ = x.shape
        if seq == 1 and cache is not None and _FUSED_QKV_ROPE is not False and not torch.is_grad_enabled():
            fused = self._fused_decode(x, prenorm, positions, position_state, cache, cache_position, mask)
            if fused is not None:
                q, k, v, attended = fused
                if attended is not None:
                    return self._output(attended.view(bsz, seq, self.n_heads * self.head_dim), residual)
                out = self.kernel(q, k, v, mask=mask, dropout_p=0.0)
                return self._output(out.transpose(1, 2).reshape(bsz, seq, self.n_heads * self.head_dim), residual)
        if prenorm is not None:
            x = prenorm(x)
        # Three matmuls, not one over concatenated weights: on an H200 (125M model, torch.compile) the
        # concatenation per step cost 2.5% of training throughput, more than the wider matmul saved.
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(bsz, seq, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(bsz, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(bsz, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = positions.apply(q, k, position_state)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v, cache_position)
        out = self.kernel(q, k, v, mask=mask, dropout_p=self.dropout if self.training else 0.0)
        return self._output(out.transpose(1, 2).reshape(bsz, seq, self.n_heads * self.head_dim), residual)

    def _output(self, heads: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        """o_proj of the heads' outputs, plus `residual` when given (for one-row inference calls, in o_proj's own
        kernel where llamaforge.kernels.residual_gemv's switches allow)."""
        if residual is None:
            return self.o_proj(heads)
        from llamaforge.kernels.residual_gemv import add_linear

        return add_linear(self.o_proj, heads, residual)

    def _fused_decode(
        self,
        x: torch.Tensor,
        prenorm: nn.Module | None,
        positions: PositionEmbedding,
        position_state: Any,
        cache: KVCache,
        cache_position: torch.Tensor | None,
        mask: AttentionMask,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
        """q (after RoPE) and the layer's full K/V caches through the fused kernel, with k and v of this step already
        written, from x not yet normalised when `prenorm` is given (an RMSNorm is folded into the kernel, another
        norm applied first), and the attention output (1, Hq*D) when the same launch attended too (else None);
        None where it does not apply (batch > 1, adapters, projections other than plain or int8 weight-only ones,
        biases, positions other than rotate-half RoPE, a cache other than the static one, unsupported layouts)."""
        from llamaforge.core.cache import StaticKVCache
        from llamaforge.kernels import fold_prenorm, fused_projections, qkv_rope
        from llamaforge.plugins.positions import RotaryEmbedding

        kind = fused_projections(_FUSED_QKV_ROPE, x, (self.q_proj, self.k_proj, self.v_proj))
        if (
            kind is None
            or x.size(0) != 1
            or cache_position is None
            or cache_position.numel() != 1
            or type(positions).apply is not RotaryEmbedding.apply
            or type(cache) is not StaticKVCache
            or cache.kv is not None
        ):
            return None
        cos, sin = position_state
        kc, vc = cache.keys[self.layer_idx], cache.values[self.layer_idx]
        norm, x = fold_prenorm(prenorm, x, _FOLD_NORM)
        row = x.view(1, x.size(-1))
        weights = (self.q_proj.weight, self.k_proj.weight, self.v_proj.weight)
        scales = None
        if kind == "int8":
            scales = (self.q_proj.weight_scale, self.k_proj.weight_scale, self.v_proj.weight_scale)
        cos, sin = cos.reshape(-1), sin.reshape(-1)
        if not qkv_rope.supported(row, weights, cos, sin, kc, vc, scales, norm):
            return None
        position = cache_position.reshape(1)
        if self._attends_in_kernel(x, mask, kc) and qkv_rope.attention_supported(
            row, weights, cos, kc, mask.mask, mask.extent, cache.sync
        ):
            scale = 1.0 / math.sqrt(self.head_dim)
            out = qkv_rope.qkv_rope_attention(row, *weights, cos, sin, kc, vc, position, mask.mask, mask.extent,
                                              cache.sync, scale, scales, norm)  # fmt: skip
            return out, kc, vc, out
        q = qkv_rope.qkv_rope_cache(row, *weights, cos, sin, kc, vc, position, scales, norm)
        return q.view(1, self.n_heads, 1, self.head_dim), kc, vc, None

    def _attends_in_kernel(self, x: torch.Tensor, mask: AttentionMask, k_cache: torch.Tensor) -> bool:
        """Whether the fused decode kernel may do this layer's attention too: the switch allows it on this device,
        the module's kernel is plain softmax attention (`sdpa` or `flash_decode`; another plugin's kernel is what
        the user chose to run), there is no dropout, the model gave an explicit mask and extent, and the cache is
        short enough for one program per key/value head."""
        if _FUSED_ATTENTION is False or (_FUSED_ATTENTION is None and x.device.type != "cuda"):
            return False
        return (
            (self.kernel is sdpa or self.kernel is flash_decode)
            and (not self.training or not self.dropout)
            and mask.mask is not None
            and mask.extent is not None
            and k_cache.size(2) <= _ATTEND_MAX_LENGTH
        )

    def extra_repr(self) -> str:
        return (
            f"heads={self.n_heads}, kv_heads={self.n_kv_heads}, head_dim={self.head_dim}, kernel={_kname(self.kernel)}"
        )


def _kname(kernel: Any) -> str:
    return getattr(kernel, "__name__", None) or getattr(getattr(kernel, "func", None), "__name__", repr(kernel))


def sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mask: AttentionMask,
    dropout_p: float = 0.0,
    scale: float | None = None,
) -> torch.Tensor:
    """torch scaled_dot_product_attention (flash / memory-efficient kernels where the hardware has them)."""
    gqa = q.size(1) != k.size(1)
    return F.scaled_dot_product_attention(
        q,
        k,
        v,
        attn_mask=mask.mask,
        is_causal=mask.causal and mask.mask is None and q.size(2) > 1,
        dropout_p=dropout_p,
        scale=scale,
        enable_gqa=gqa,
    )


def eager(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mask: AttentionMask,
    dropout_p: float = 0.0,
    scale: float | None = None,
) -> torch.Tensor:
    """Reference implementation: explicit scores, fp32 softmax. Slow; for checking other kernels."""
    rep = q.size(1) // k.size(1)
    if rep > 1:
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
    scale = scale if scale is not None else 1.0 / math.sqrt(q.size(-1))
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if mask.mask is not None:
        scores = scores.masked_fill(~mask.mask, float("-inf"))
    elif mask.causal:
        t, s = q.size(2), k.size(2)
        causal = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(diagonal=s - t)
        scores = scores.masked_fill(~causal, float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    if dropout_p:
        probs = F.dropout(probs, dropout_p, True)
    return torch.matmul(probs, v)


def flash_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mask: AttentionMask,
    dropout_p: float = 0.0,
    scale: float | None = None,
) -> torch.Tensor:
    """`sdpa`, except that one-query calls on CUDA with an explicit (B, 1, 1, L) mask, which is what decoding over
    the static KV cache makes, run the Triton flash-decoding kernel of `llamaforge.kernels.decode_attention`:
    query heads sharing a key/value head read it once, only the positions below the mask's `extent` are read, and
    a long cache is split over the GPU."""
    allowed, extent = mask.mask, mask.extent
    b = q.size(0)
    if q.is_cuda and allowed is not None and not dropout_p and allowed.shape == (b, 1, 1, k.size(2)):
        from llamaforge.kernels import decode_attention as dec  # imported on CUDA only: it registers a Triton op

        if dec.available(q, k):
            scale = scale if scale is not None else dec.default_scale(q)
            extent = extent if extent is not None and extent.shape == (b,) else None
            return dec.decode_attention(q, k, v, allowed.reshape(b, k.size(2)), scale, extent)
    return sdpa(q, k, v, mask=mask, dropout_p=dropout_p, scale=scale)


@hookimpl
def llamaforge_register(register):
    register("attention", "rope_attention", RopeAttention)
    register("attention_kernel", "sdpa", sdpa)
    register("attention_kernel", "eager", eager)
    register("attention_kernel", "flash_decode", flash_decode)
