"""Components added by this package: activation `relu2` (squared ReLU, Primer) and norm `scalenorm`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llamaforge import Activation, Norm, hookimpl


class ReLU2(Activation):
    """Squared ReLU: relu(x)^2 (So et al., Primer), a non-gated FFN nonlinearity."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x).square()


class ScaleNorm(Norm):
    """x * g / ||x||: one learned scalar instead of a per-channel weight (Nguyen & Salazar)."""

    scale_invariant = True

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.dim = dim
        self.scale = nn.Parameter(torch.tensor(float(dim) ** 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        norm = x32.norm(dim=-1, keepdim=True).clamp(min=self.eps)
        return (self.scale * x32 / norm).to(x.dtype)

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.scale.fill_(float(self.dim) ** 0.5)


@hookimpl
def llamaforge_register(register):
    register("activation", "relu2", ReLU2)
    register("norm", "scalenorm", ScaleNorm)
