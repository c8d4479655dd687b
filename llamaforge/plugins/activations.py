"""Feed-forward nonlinearities: swiglu and geglu (gated), gelu, relu, silu (plain)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llamaforge.core.interfaces import Activation
from llamaforge.registry import hookimpl


class SwiGLU(Activation):
    """SiLU on the gate branch, multiplied by the up branch (Llama)."""

    gated = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(x)


class GeGLU(Activation):
    """GELU (tanh approximation) on the gate branch, multiplied by the up branch."""

    gated = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x, approximate="tanh")


class GELU(Activation):
    """Plain GELU; approximate='tanh' for the GPT-2 variant."""

    def __init__(self, approximate: str = "none") -> None:
        super().__init__()
        if approximate not in ("none", "tanh"):
            raise ValueError(f"gelu approximate must be 'none' or 'tanh', got {approximate!r}")
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x, approximate=self.approximate)


class ReLU(Activation):
    """Plain ReLU (the seed chapter's feed-forward baseline)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x)


class SiLU(Activation):
    """Plain SiLU without a gate."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(x)


@hookimpl
def llamaforge_register(register):
    register("activation", "swiglu", SwiGLU)
    register("activation", "geglu", GeGLU)
    register("activation", "gelu", GELU)
    register("activation", "relu", ReLU)
    register("activation", "silu", SiLU)
