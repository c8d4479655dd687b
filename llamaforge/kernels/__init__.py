"""Hand-written GPU kernels that the built-in plugins can route to. Each has a plain-PyTorch reference (used on
other devices and by the tests) and imports Triton only when a CUDA tensor first needs it."""

import importlib.util
from typing import Any

import torch
import torch.nn.functional as F

# Whether a Triton kernel can be traced into a compiled graph here: torch with `torch.library.triton_op` and Triton
# installed. Decided once at import: the check runs inside traced code (the decode step's attention), where a
# module lookup per call is work dynamo would have to trace on every compile.
TRITON_OPS = hasattr(torch.library, "triton_op") and importlib.util.find_spec("triton") is not None


_SAME = object()  # fused_projections: int8 weight-only projections answer to the same switch as plain ones


def fused_projections(
    switch: bool | None, x: torch.Tensor, linears: tuple, int8_switch: bool | object | None = _SAME
) -> str | None:
    """Whether a fused one-row decode kernel may take these projections under its switch (True: any device, CPUs
    running the op's reference; None: CUDA only; False: never): "plain" (nn.Linear), "int8" (int8 weight-only), or
    None (adapters, biases, other quantizers, switched off, or no Triton op here). `int8_switch`, when given, is the
    switch int8 weight-only projections answer to instead (a kernel on by default for one weight kind only). Tensor
    metadata and types only: this runs inside traced decode steps."""
    from torch import nn

    from llamaforge.plugins.quantizers import Int8Linear

    if all(type(p) is nn.Linear and p.bias is None for p in linears):
        kind = "plain"
    elif all(type(p) is Int8Linear and not p.dynamic and p.bias is None for p in linears):
        kind = "int8"
    else:
        return None
    on = int8_switch if kind == "int8" and int8_switch is not _SAME else switch
    cuda = x.device.type == "cuda"
    if on is False or (on is None and not cuda) or (cuda and not TRITON_OPS):
        return None
    return kind


def fold_prenorm(prenorm: Any, x: torch.Tensor, fold: bool = True) -> tuple[tuple[torch.Tensor, float] | None, Any]:
    """(the RMSNorm's (weight, eps) for the kernel to apply, x) when `prenorm` is llamaforge's RMSNorm in x's dtype
    (and `fold`); otherwise (None, x after `prenorm`, if any)."""
    from llamaforge.plugins.norms import RMSNorm

    if prenorm is None:
        return None, x
    if fold and type(prenorm) is RMSNorm and prenorm.weight.dtype == x.dtype:
        return (prenorm.weight, prenorm.eps), x
    return None, prenorm(x)


# ----- what the fused decode kernels (qkv_rope, gate_up) share -------------------------------------------------------
def rms_row(x: torch.Tensor, norm: tuple[torch.Tensor, float] | None) -> torch.Tensor:
    """x as fp32 after llamaforge's RMSNorm with (weight, eps) in x's dtype (fp32 statistics, the normalised row
    rounded to x's dtype, then times the weight, rounded again), or x itself without a norm."""
    xf = x.float()
    if norm is None:
        return xf
    weight, eps = norm
    xf = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype).float()
    return (xf * weight.float()).to(x.dtype).float()


def row_tiles(
    k_len: int, given: tuple[int | None, int | None, int | None], defaults: tuple[int, int, int]
) -> tuple[int, int, int]:
    """A one-row kernel's launch settings (output rows per program, values per row per loop step, warps): those
    given, else the defaults; the loop step at most the row's length rounded up to a power of two, so a short row
    is not padded past one step."""
    block_n, block_k, warps = (g or d for g, d in zip(given, defaults, strict=True))
    return block_n, min(block_k, 1 << (int(k_len) - 1).bit_length()), warps


def row_products(
    xf: torch.Tensor, weights: tuple[torch.Tensor, ...], scales: tuple[torch.Tensor, ...] | None, dtype: torch.dtype
) -> list[torch.Tensor]:
    """The fp32 row times each matrix, each product rounded to `dtype` like its linear's output; int8 weight-only
    ones times their rows' scales and rounded again, as int8_weight_only_linear computes them (returned as fp32)."""
    out = [F.linear(xf, w.float()).to(dtype).float() for w in weights]
    if scales is not None:
        out = [(t * sc.float()).to(dtype).float() for t, sc in zip(out, scales, strict=True)]
    return out


def operands_supported(
    x: torch.Tensor,
    weights: tuple[torch.Tensor, ...],
    scales: tuple[torch.Tensor, ...] | None,
    norm: tuple[torch.Tensor, float] | None,
) -> bool:
    """The operands every fused decode kernel takes (tensor metadata only: this runs inside traced decode steps): one
    contiguous row (1, K), K > 1; row-major matrices of width K in x's dtype, or int8 with per-row scales in x's
    dtype; a folded norm's weight in x's dtype, one per column."""
    k_len = x.shape[-1]
    weight_dtype = x.dtype if scales is None else torch.int8
    return (
        x.dim() == 2
        and x.size(0) == 1
        and k_len > 1
        and x.stride(-1) == 1
        and all(w.dim() == 2 and w.size(1) == k_len and w.stride(-1) == 1 and w.dtype == weight_dtype for w in weights)
        and (
            scales is None
            or all(
                sc.dtype == x.dtype and sc.shape == (w.size(0),) and sc.stride(0) == 1
                for sc, w in zip(scales, weights, strict=True)
            )
        )
        and (norm is None or (norm[0].dtype == x.dtype and norm[0].shape == (k_len,) and norm[0].stride(0) == 1))
    )


def pack_extras(
    scales: tuple[torch.Tensor, ...] | None, norm: tuple[torch.Tensor, float] | None
) -> tuple[list[torch.Tensor], list[torch.Tensor], float]:
    """The optional int8 scales and folded norm as the custom ops take them: lists, empty for none (an op schema has
    no optional list), and the norm's eps."""
    return list(scales or ()), ([norm[0]] if norm is not None else []), float(norm[1]) if norm is not None else 0.0


def unpack_extras(
    scales: list[torch.Tensor], norm_weight: list[torch.Tensor], eps: float
) -> tuple[tuple[torch.Tensor, ...] | None, tuple[torch.Tensor, float] | None]:
    """`pack_extras` undone inside an op."""
    return (tuple(scales) if scales else None), ((norm_weight[0], eps) if norm_weight else None)
