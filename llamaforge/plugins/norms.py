"""Norms: rmsnorm (Llama), layernorm, identity (for models without a final norm, e.g. the seed baseline)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llamaforge.core.interfaces import Norm
from llamaforge.registry import hookimpl


class RMSNorm(Norm):
    """Root-mean-square norm computed in fp32 (as Llama does), then cast back and scaled by a learned weight."""

    scale_invariant = True

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if dtype == torch.float32 and self.weight.dtype == torch.float32 and not torch.compiler.is_compiling():
            # the fused op gives bitwise the same result for fp32 in one dispatch instead of six (eager decoding
            # of small models is dispatch-bound); compiled graphs keep the explicit form inductor fuses anyway
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class LayerNorm(Norm):
    """Standard LayerNorm (mean-centred, with bias unless bias=false)."""

    scale_invariant = True

    def __init__(self, dim: int, eps: float = 1e-5, bias: bool = True) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        w = self.weight.float()
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), (x.shape[-1],), w, b, self.eps).to(dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class IdentityNorm(Norm):
    """No normalisation (keeps the slot filled for models that have none)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


@hookimpl
def llamaforge_register(register):
    register("norm", "rmsnorm", RMSNorm)
    register("norm", "layernorm", LayerNorm)
    register("norm", "identity", IdentityNorm)
