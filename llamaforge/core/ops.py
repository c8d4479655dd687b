"""Small tensor operations shared by core and components."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FUSE_MIN_ROWS = 64  # below this many input rows, fused_linear runs the layers separately


def fused_linear(x: torch.Tensor, linears: tuple[nn.Linear, ...]) -> tuple[torch.Tensor, ...]:
    """Apply several nn.Linear layers that share an input as one matmul and split the result.

    Wider matmuls keep the GPU busier than three narrow ones (k/v are narrow under GQA); the concatenation of
    weights fuses with autocast's cast under torch.compile, and gradients flow back to each parameter."""
    if x.numel() < FUSE_MIN_ROWS * x.size(-1):
        # Few rows (incremental decoding): the matmuls are bound by reading the weights, and concatenating them
        # would read and write every weight once more per call, doubling a decode step's memory traffic.
        return tuple(m(x) for m in linears)
    weight = torch.cat([m.weight for m in linears])
    biases = [m.bias for m in linears]
    bias = torch.cat(biases) if all(b is not None for b in biases) else None
    if bias is None and any(b is not None for b in biases):
        return tuple(m(x) for m in linears)
    out = F.linear(x, weight, bias)
    return tuple(out.split([m.out_features for m in linears], dim=-1))
