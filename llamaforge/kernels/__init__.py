"""Hand-written GPU kernels that the built-in plugins can route to. Each has a plain-PyTorch reference (used on
other devices and by the tests) and imports Triton only when a CUDA tensor first needs it."""

import importlib.util
from typing import Any

import torch

# Whether a Triton kernel can be traced into a compiled graph here: torch with `torch.library.triton_op` and Triton
# installed. Decided once at import: the check runs inside traced code (the decode step's attention), where a
# module lookup per call is work dynamo would have to trace on every compile.
TRITON_OPS = hasattr(torch.library, "triton_op") and importlib.util.find_spec("triton") is not None


def fused_projections(switch: bool | None, x: torch.Tensor, linears: tuple) -> str | None:
    """Whether a fused one-row decode kernel may take these projections under its switch (True: any device, CPUs
    running the op's reference; None: CUDA only; False: never): "plain" (nn.Linear), "int8" (int8 weight-only), or
    None (adapters, biases, other quantizers, or no Triton op here). Tensor metadata and types only: this runs
    inside traced decode steps."""
    from torch import nn

    from llamaforge.plugins.quantizers import Int8Linear

    cuda = x.device.type == "cuda"
    if switch is False or (switch is None and not cuda) or (cuda and not TRITON_OPS):
        return None
    if all(type(p) is nn.Linear and p.bias is None for p in linears):
        return "plain"
    if all(type(p) is Int8Linear and not p.dynamic and p.bias is None for p in linears):
        return "int8"
    return None


def fold_prenorm(prenorm: Any, x: torch.Tensor, fold: bool = True) -> tuple[tuple[torch.Tensor, float] | None, Any]:
    """(the RMSNorm's (weight, eps) for the kernel to apply, x) when `prenorm` is llamaforge's RMSNorm in x's dtype
    (and `fold`); otherwise (None, x after `prenorm`, if any)."""
    from llamaforge.plugins.norms import RMSNorm

    if prenorm is None:
        return None, x
    if fold and type(prenorm) is RMSNorm and prenorm.weight.dtype == x.dtype:
        return (prenorm.weight, prenorm.eps), x
    return None, prenorm(x)
